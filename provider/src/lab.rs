#[derive(clap::Args)] pub struct LabArgs {} pub async fn run(_a: LabArgs) -> anyhow::Result<()> { Ok(()) }
