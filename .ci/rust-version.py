#!/usr/bin/env python3
"""The true minimum Rust version of a workspace member: the highest `rust_version` that any crate
in its locked dependency graph declares (normal and build dependencies, and the member's own
dev-dependencies, since `cargo test` builds them too), on the platforms we build for.

    python3 .ci/rust-version.py nen-relay           prints e.g. 1.89
    python3 .ci/rust-version.py --check MEMBER...   fails unless each member's rust-version says so

Target-specific dependencies count only on the platforms listed below: `cargo metadata` without
--filter-platform also lists dependencies behind cfgs that no build sets (e.g. `cfg(loom)`).
"""
import json
import subprocess
import sys

PLATFORMS = [
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "x86_64-unknown-linux-musl",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
]


def version_key(text):
    return tuple(int(part) for part in text.split("."))


def metadata(platform):
    output = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", platform],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(output)


def requirement(meta, member):
    """(highest rust_version, the crate that declares it) over MEMBER's graph."""
    packages = {package["id"]: package for package in meta["packages"]}
    nodes = {node["id"]: node for node in meta["resolve"]["nodes"]}
    [root] = [p["id"] for p in meta["packages"] if p["name"] == member and p["source"] is None]
    seen, stack = set(), [root]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for dependency in nodes[current]["deps"]:
            kinds = {kind["kind"] for kind in dependency["dep_kinds"]}
            if kinds & {None, "build"} or (current == root and "dev" in kinds):
                stack.append(dependency["pkg"])
    seen.discard(root)
    declared = [(packages[i]["rust_version"], packages[i]) for i in seen if packages[i]["rust_version"]]
    version, package = max(declared, key=lambda item: version_key(item[0]))
    return version, f"{package['name']} {package['version']}", packages[root]["rust_version"]


def main(arguments):
    check = arguments[:1] == ["--check"]
    members = arguments[1:] if check else arguments
    if not members:
        sys.exit(__doc__)
    metas = [metadata(platform) for platform in PLATFORMS]
    failed = False
    for member in members:
        found = [requirement(meta, member) for meta in metas]
        needed, by, declared = max(found, key=lambda item: version_key(item[0]))
        needed = ".".join(needed.split(".")[:2])
        if not check:
            print(needed)
        elif declared is None or version_key(declared)[:2] != version_key(needed):
            print(f"{member}: rust-version is {declared}, but the locked crates need {needed} ({by})")
            failed = True
        else:
            print(f"{member}: rust-version {declared} ({by} needs it)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
