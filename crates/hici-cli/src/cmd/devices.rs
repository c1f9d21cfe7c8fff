//! `hici devices`: the backends compiled in and the devices each one finds.

use crate::args::ModelArgs;
use crate::backend::compiled_in;
use anyhow::Result;
use serde_json::{json, Value};

pub fn run(m: &ModelArgs) -> Result<()> {
    let mut found = vec![json!({
        "backend": "ndarray",
        "device": "cpu",
        "select": "--device ndarray",
        "detail": format!(
            "{} logical cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    })];
    #[cfg(feature = "wgpu")]
    found.extend(wgpu_adapters());
    #[cfg(feature = "cuda")]
    found.extend(cuda_devices());
    if m.json {
        println!(
            "{}",
            json!({"compiled_in": compiled_in(), "devices": found})
        );
    } else {
        println!("compiled in: {}", compiled_in().join(", "));
        for d in &found {
            let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("");
            let mut line = format!("  {:8} {}", s("backend"), s("device"));
            for k in ["detail", "select", "why"] {
                if !s(k).is_empty() {
                    line.push_str(&format!("  [{}]", s(k)));
                }
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// Every adapter wgpu can see (name, graphics API, device type, driver) and the `--device`
/// text that selects it (`wgpu:API:N`, N counted within its API).
#[cfg(feature = "wgpu")]
fn wgpu_adapters() -> Vec<Value> {
    use hici_engine::device::{wgpu_adapters, wgpu_backend, wgpu_select_text};
    let default_api = wgpu_backend(None);
    match wgpu_adapters() {
        Ok(infos) if !infos.is_empty() => infos
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let driver = [i.driver.trim(), i.driver_info.trim()]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" ");
                let index = infos[..n].iter().filter(|o| o.backend == i.backend).count();
                let select = wgpu_select_text(i.backend, index);
                let mut v = json!({
                    "backend": "wgpu",
                    "device": i.name,
                    "api": format!("{:?}", i.backend),
                    "type": format!("{:?}", i.device_type),
                    "driver": driver,
                    "usable": select.is_some(),
                    "default_api": i.backend == default_api,
                    "detail": format!("{:?}, {:?}, driver {driver}", i.backend, i.device_type),
                });
                v["select"] = match select {
                    Some(s) => json!(s),
                    None => json!(format!(
                        "not selectable: {:?} is not an API --device names",
                        i.backend
                    )),
                };
                v
            })
            .collect(),
        Ok(_) => vec![json!({
            "backend": "wgpu", "device": "none", "available": false,
            "why": "no adapter found (no Vulkan/Metal/DX12/GL driver; on Linux without a GPU \
                    install mesa-vulkan-drivers for lavapipe)",
        })],
        Err(e) => vec![json!({
            "backend": "wgpu", "device": "none", "available": false,
            "why": e.to_string(),
        })],
    }
}

/// CUDA devices with name, memory and compute capability, probed without letting burn
/// touch the driver (burn panics when libcuda is missing).
#[cfg(feature = "cuda")]
fn cuda_devices() -> Vec<Value> {
    let n = match crate::backend::cuda_device_count() {
        Ok(0) => {
            return vec![
                json!({"backend": "cuda", "device": "none", "available": false,
                "why": "no CUDA device found"}),
            ]
        }
        Ok(n) => n,
        Err(e) => {
            return vec![
                json!({"backend": "cuda", "device": "none", "available": false,
                "why": e.to_string()}),
            ]
        }
    };
    (0..n)
        .map(|i| {
            let info = crate::backend::quiet_catch(|| {
                let ctx = cudarc::driver::CudaContext::new(i)?;
                Ok::<_, cudarc::driver::DriverError>((
                    ctx.name()?,
                    ctx.total_mem()?,
                    ctx.compute_capability()?,
                ))
            });
            match info {
                Some(Ok((name, mem, (major, minor)))) => json!({
                    "backend": "cuda",
                    "device": name,
                    "index": i,
                    "memory_bytes": mem,
                    "compute_capability": format!("{major}.{minor}"),
                    "detail": format!("{:.1} GiB, compute {major}.{minor}",
                        mem as f64 / (1u64 << 30) as f64),
                    "select": format!("--device cuda:{i}"),
                }),
                Some(Err(e)) => json!({"backend": "cuda", "device": format!("cuda:{i}"),
                    "index": i, "available": false, "why": format!("{e:?}")}),
                None => json!({"backend": "cuda", "device": format!("cuda:{i}"),
                    "index": i, "available": false, "why": "the CUDA driver panicked"}),
            }
        })
        .collect()
}
