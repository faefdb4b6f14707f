//! `nen-relay fake-nen`: a stand-in for Nen's `POST /runs` that calls back like Nen does.

use clap::Args;

/// Options of `nen-relay fake-nen`.
#[derive(Debug, Clone, Args)]
pub struct FakeNenArgs {}

pub async fn run(_args: FakeNenArgs) -> anyhow::Result<()> {
    anyhow::bail!("nen-relay fake-nen is not implemented yet")
}
