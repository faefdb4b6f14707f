//! Where a running nen-relay is and how to authenticate to it: what every subcommand that talks
//! to the server over its API (`wait`, `forward`) shares.

use anyhow::Context;
use clap::Args;
use url::Url;

/// `--url` and `--token`, from the environment by default.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// nen-relay's base URL.
    #[arg(
        long,
        env = "NEN_RELAY_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: Url,
    /// Bearer token for /v1. Default: NEN_RELAY_TOKEN, else the first of NEN_RELAY_API_TOKENS.
    #[arg(long, env = "NEN_RELAY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

impl ServerArgs {
    /// `--token`, else `NEN_RELAY_TOKEN`, else the first of `NEN_RELAY_API_TOKENS` (for a
    /// script that runs beside the server).
    pub fn token(&self) -> anyhow::Result<String> {
        self.token
            .clone()
            .filter(|token| !token.is_empty())
            .or_else(first_api_token)
            .context("give --token, or set NEN_RELAY_TOKEN (or NEN_RELAY_API_TOKENS)")
    }

    /// `<base>/<segments...>`, each segment encoded as one path segment, with no query.
    pub fn endpoint<'s>(&self, segments: impl IntoIterator<Item = &'s str>) -> anyhow::Result<Url> {
        let mut url = self.url.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("--url {} cannot be a base URL", self.url))?
            .pop_if_empty()
            .extend(segments);
        url.set_query(None);
        Ok(url)
    }
}

/// The first of `NEN_RELAY_API_TOKENS`.
fn first_api_token() -> Option<String> {
    std::env::var("NEN_RELAY_API_TOKENS")
        .ok()?
        .split(',')
        .map(str::trim)
        .find(|token| !token.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(url: &str) -> ServerArgs {
        ServerArgs {
            url: Url::parse(url).unwrap(),
            token: None,
        }
    }

    #[test]
    fn endpoints_encode_each_segment_under_the_base_path() {
        assert_eq!(
            server("http://127.0.0.1:8080")
                .endpoint(["v1", "runs", "a/b c"])
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/v1/runs/a%2Fb%20c"
        );
        assert_eq!(
            server("https://relay.example/prefix/?x=1")
                .endpoint(["v1", "forwarding"])
                .unwrap()
                .as_str(),
            "https://relay.example/prefix/v1/forwarding"
        );
    }
}
