//! `nen-relay bench`: a bounded load generator with a loss check.

use clap::Args;

/// Options of `nen-relay bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("nen-relay bench is not implemented yet")
}
