//! Writes the fuzz targets' seed corpora (`tessera_fuzz::seeds`) under the directory given
//! (the repository's is `fuzz/corpus`).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz-seeds DIR (the repository's corpora are in fuzz/corpus)");
        return ExitCode::FAILURE;
    };
    match tessera_fuzz::seeds::write(&dir) {
        Ok(n) => {
            println!("{n} seeds written under {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot write the seeds under {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
