//! Writes an OCI image archive with no base image and no registry: one layer
//! holding the given files (static binaries) in an otherwise empty root, as
//! `FROM scratch` + `COPY` would, in the OCI image layout
//! (<https://github.com/opencontainers/image-spec/blob/v1.1.0/image-layout.md>)
//! that `ctr images import` and `podman load` read.
//!
//! The archive is reproducible: every timestamp is 0 and every owner root.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// Empty directories every image gets: runc mounts over them.
const DIRS: [&str; 5] = ["dev", "proc", "sys", "tmp", "etc"];

/// A file of the image.
pub struct File {
    /// Path in the image, relative (`bin/fdloop`).
    pub path: PathBuf,
    /// Where its contents are read from on the host.
    pub source: PathBuf,
    pub mode: u32,
}

/// An image to write.
pub struct Image<'a> {
    /// The full reference it is imported as (`docker.io/library/x:1`).
    pub name: &'a str,
    pub files: &'a [File],
    /// The OCI `Entrypoint` (run arguments are appended to it) and `Cmd`
    /// (run arguments replace it); empty ones are left out.
    pub entrypoint: &'a [&'a str],
    pub cmd: &'a [&'a str],
}

/// A content-addressed blob.
struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
        Blob { digest, bytes }
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// Writes `image` as an OCI archive (a tar of the image layout) to `out`.
pub fn write_archive(image: &Image, out: &Path) -> io::Result<()> {
    let layer = Blob::new(layer(image.files)?);
    let mut run = json!({"Env": ["PATH=/bin"]});
    if !image.entrypoint.is_empty() {
        run["Entrypoint"] = json!(image.entrypoint);
    }
    if !image.cmd.is_empty() {
        run["Cmd"] = json!(image.cmd);
    }
    let config = Blob::new(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config.descriptor(CONFIG),
        "layers": [layer.descriptor(LAYER)],
    }))?);
    let tag = image.name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let mut entry = manifest.descriptor(MANIFEST);
    entry["platform"] = json!({"architecture": "amd64", "os": "linux"});
    // containerd names the image after `io.containerd.image.name`; other
    // tools use the tag in `org.opencontainers.image.ref.name`.
    entry["annotations"] = json!({
        "io.containerd.image.name": image.name,
        "org.opencontainers.image.ref.name": tag,
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry],
    }))?;

    let mut tar = tar::Builder::new(io::BufWriter::new(fs::File::create(out)?));
    append(
        &mut tar,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append(&mut tar, "index.json", &index, 0o644)?;
    for blob in [&layer, &config, &manifest] {
        let hex = blob.digest.trim_start_matches("sha256:");
        append(&mut tar, &format!("blobs/sha256/{hex}"), &blob.bytes, 0o644)?;
    }
    tar.into_inner()?.flush()
}

/// The layer: the directories, then each file with its parents.
fn layer(files: &[File]) -> io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs: Vec<PathBuf> = DIRS.iter().map(PathBuf::from).collect();
    for f in files {
        let mut parent = f.path.parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(p.to_owned());
            parent = p.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        let mut header = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut header, dir, io::empty())?;
    }
    for f in files {
        let bytes = fs::read(&f.source)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.source.display())))?;
        let mut header = header(tar::EntryType::Regular, f.mode, bytes.len() as u64);
        tar.append_data(&mut header, &f.path, bytes.as_slice())?;
    }
    tar.into_inner()
}

fn append<W: io::Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
    mode: u32,
) -> io::Result<()> {
    let mut header = header(tar::EntryType::Regular, mode, bytes.len() as u64);
    tar.append_data(&mut header, path, bytes)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_a_consistent_image_layout() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("hello");
        fs::write(&bin, b"\x7fELF not really").unwrap();
        let image = Image {
            name: "docker.io/library/t:1",
            files: &[File {
                path: "bin/hello".into(),
                source: bin,
                mode: 0o755,
            }],
            entrypoint: &["/bin/hello"],
            cmd: &[],
        };
        let out = dir.path().join("t.tar");
        write_archive(&image, &out).unwrap();
        let first = fs::read(&out).unwrap();
        write_archive(&image, &out).unwrap();
        assert_eq!(first, fs::read(&out).unwrap(), "not reproducible");

        // Every blob is stored under its digest, and the index leads to the
        // manifest, the config and the layer, which holds the file.
        let mut blobs = std::collections::HashMap::new();
        let mut index = None;
        for entry in tar::Archive::new(first.as_slice()).entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(format!("{:x}", Sha256::digest(&bytes)), hex);
                blobs.insert(format!("sha256:{hex}"), bytes);
            } else if path == "index.json" {
                index = Some(serde_json::from_slice::<Value>(&bytes).unwrap());
            }
        }
        let index = index.expect("index.json");
        let entry = &index["manifests"][0];
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            "docker.io/library/t:1"
        );
        let blob = |d: &Value| -> &Vec<u8> { &blobs[d["digest"].as_str().unwrap()] };
        let manifest: Value = serde_json::from_slice(blob(entry)).unwrap();
        let config: Value = serde_json::from_slice(blob(&manifest["config"])).unwrap();
        let layer = blob(&manifest["layers"][0]);
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        assert_eq!(config["config"]["Entrypoint"][0], "/bin/hello");
        assert!(config["config"].get("Cmd").is_none());
        let names: Vec<String> = tar::Archive::new(layer.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"bin/hello".to_owned()), "{names:?}");
        assert!(
            names.contains(&"proc".to_owned()) || names.contains(&"proc/".to_owned()),
            "{names:?}"
        );
    }
}
