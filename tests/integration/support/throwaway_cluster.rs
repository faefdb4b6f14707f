//! A PostgreSQL cluster of the suite's own, for when no server answers: made with `initdb` from
//! the installed server binaries, served on a free loopback port, and stopped (its files
//! removed) when the test binary exits.
//!
//! `initdb` and `postgres` refuse to run as root, so as root both run as the `postgres` user.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, Uid, User};

/// Every cluster directory starts with this, then the test binary's pid.
const DIR_PREFIX: &str = "nen-relay-test-postgres-";
/// The line PostgreSQL logs once it accepts connections (messages are forced to English).
const READY: &str = "database system is ready to accept connections";
/// Bounds a start that hangs; a normal start takes about a second.
const START_GUARD: Duration = Duration::from_secs(60);

/// A running cluster; `admin_url` reaches its `postgres` database as superuser.
pub struct Cluster {
    pub admin_url: String,
}

/// What the exit handler needs to stop the server and remove its files.
struct Running {
    server: Pid,
    directory: PathBuf,
    events: Receiver<ServerEvent>,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

enum ServerEvent {
    Ready,
    /// The server exited; the lines it logged before it was ready, for the error message.
    Exited(std::io::Result<ExitStatus>, Vec<String>),
}

/// Makes and starts a cluster. The error says why none could be started.
pub fn start() -> Result<Cluster, String> {
    let binaries = server_binaries()?;
    let owner = owner()?;
    remove_abandoned_clusters();
    let directory = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|error| format!("cannot make a temporary directory: {error}"))?
        .keep();
    let started = initdb(&binaries, &directory, owner.as_ref()).and_then(|()| {
        // A port found free may be taken before the server binds it: then try another.
        let mut started = serve(&binaries, &directory, owner.as_ref());
        for _ in 1..3 {
            if started.is_ok() {
                break;
            }
            started = serve(&binaries, &directory, owner.as_ref());
        }
        started
    });
    if started.is_err() {
        let _ = std::fs::remove_dir_all(&directory);
    }
    started
}

/// `initdb` and `postgres`: on PATH, or where Debian and Ubuntu install them (newest first).
fn server_binaries() -> Result<PathBuf, String> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    on_path
        .into_iter()
        .chain(versions.into_iter().map(|(_, bin)| bin))
        .find(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .ok_or_else(|| {
            "PostgreSQL's server binaries (initdb, postgres) are neither on PATH nor under \
             /usr/lib/postgresql/*/bin"
                .to_owned()
        })
}

/// The user the server runs as: this one, or `postgres` when this one is root.
fn owner() -> Result<Option<User>, String> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some(user)),
        Ok(None) => Err("initdb refuses to run as root, and there is no `postgres` user".into()),
        Err(error) => Err(format!("cannot look up the `postgres` user: {error}")),
    }
}

fn command(binary: PathBuf, directory: &Path, owner: Option<&User>) -> Command {
    let mut command = Command::new(binary);
    command.current_dir(directory);
    if let Some(user) = owner {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

fn initdb(binaries: &Path, directory: &Path, owner: Option<&User>) -> Result<(), String> {
    if let Some(user) = owner {
        chown(directory, Some(user.uid.as_raw()), Some(user.gid.as_raw())).map_err(|error| {
            format!(
                "cannot give {} to {}: {error}",
                directory.display(),
                user.name
            )
        })?;
    }
    let output = command(binaries.join("initdb"), directory, owner)
        .arg("--pgdata")
        .arg(directory.join("data"))
        .args([
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ])
        .arg("--no-sync")
        .output()
        .map_err(|error| format!("cannot run {}/initdb: {error}", binaries.display()))?;
    if !output.status.success() {
        return Err(format!(
            "initdb failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Starts the server from a thread that lives as long as it does: the server gets SIGINT
/// (a fast shutdown) if that thread ends, so a test binary that is killed takes it along.
fn serve(binaries: &Path, directory: &Path, owner: Option<&User>) -> Result<Cluster, String> {
    let port = free_port()?;
    let mut server = command(binaries.join("postgres"), directory, owner);
    server
        .arg("-D")
        .arg(directory.join("data"))
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", &format!("port={port}")])
        // TCP only: a socket path under a long TMPDIR could pass the kernel's length limit.
        .args(["-c", "unix_socket_directories="])
        .args(["-c", "lc_messages=C"])
        // Nothing here needs to survive a crash.
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: runs in the child between fork and exec, and only calls prctl, which is
    // async-signal-safe. It comes after `uid()` takes effect, which would otherwise clear it.
    unsafe {
        server.pre_exec(|| {
            prctl::set_pdeathsig(Signal::SIGINT)?;
            Ok(())
        });
    }
    let (events, received) = mpsc::channel();
    let (started, pid) = mpsc::channel();
    std::thread::Builder::new()
        .name("throwaway-postgres".into())
        .spawn(move || watch(server, started, events))
        .map_err(|error| format!("cannot start a thread to run PostgreSQL: {error}"))?;
    let pid = pid
        .recv()
        .map_err(|_| "the thread running PostgreSQL ended early".to_owned())??;
    match received.recv_timeout(START_GUARD) {
        Ok(ServerEvent::Ready) => {}
        Ok(ServerEvent::Exited(status, log)) => {
            let status = status.map_or_else(|error| error.to_string(), |s| s.to_string());
            return Err(format!("postgres exited ({status}): {}", log.join(" | ")));
        }
        Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
            let _ = kill(pid, Signal::SIGKILL);
            return Err(format!("postgres was not ready within {START_GUARD:?}"));
        }
    }
    *RUNNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Running {
        server: pid,
        directory: directory.to_owned(),
        events: received,
    });
    // SAFETY: registers a plain function with no arguments, as atexit expects.
    if unsafe { nix::libc::atexit(stop_at_exit) } != 0 {
        stop_at_exit();
        return Err("cannot register the clean-up that stops PostgreSQL at exit".into());
    }
    Ok(Cluster {
        admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    })
}

/// Runs on its own thread: spawns the server, reports when it is ready, and when it exits.
fn watch(
    mut server: Command,
    started: mpsc::Sender<Result<Pid, String>>,
    events: mpsc::Sender<ServerEvent>,
) {
    let mut child = match server.spawn() {
        Ok(child) => child,
        Err(error) => {
            let _ = started.send(Err(format!("cannot start postgres: {error}")));
            return;
        }
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    let _ = started.send(Ok(pid));
    // Reading to the end also keeps the pipe drained, so the server never blocks on its log.
    let mut early_log = VecDeque::new();
    let mut ready = false;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if ready {
                continue;
            }
            if line.contains(READY) {
                ready = true;
                let _ = events.send(ServerEvent::Ready);
            } else {
                if early_log.len() == 20 {
                    early_log.pop_front();
                }
                early_log.push_back(line);
            }
        }
    }
    let status = child.wait();
    let _ = events.send(ServerEvent::Exited(status, early_log.into()));
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("cannot find a free port: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| format!("cannot find a free port: {error}"))
}

/// Stops the server (a fast shutdown ends every session) and removes its files.
extern "C" fn stop_at_exit() {
    let running = RUNNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    let Some(running) = running else {
        return;
    };
    let _ = kill(running.server, Signal::SIGINT);
    if running
        .events
        .recv_timeout(Duration::from_secs(30))
        .is_err()
    {
        let _ = kill(running.server, Signal::SIGKILL);
        let _ = running.events.recv_timeout(Duration::from_secs(5));
    }
    let _ = std::fs::remove_dir_all(&running.directory);
}

/// Removes the directories of clusters whose test binary no longer runs (it was killed before
/// its exit handler could clean up; its server went with it).
fn remove_abandoned_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner_pid = name
            .to_str()
            .and_then(|name| name.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok());
        if let Some(pid) = owner_pid {
            if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
