//! `repnoise fetch`.

use super::*;

/// Fetch an embedded asset into the cache and print its path.
#[derive(Args)]
pub struct Args {
    /// smollm2-135m-instruct or all-minilm-l6-v2.
    pub name: String,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args { name } = a;
    let a = repnoise::model::assets::asset(&name)
        .with_context(|| format!("`{name}` is not an embedded asset"))?;
    let cache = g
        .cache_dir
        .clone()
        .unwrap_or_else(repnoise::model::assets::default_cache_dir);
    let p = repnoise::model::assets::fetch(&a, &cache)?;
    println!("{}", p.display());
    Ok(())
}
