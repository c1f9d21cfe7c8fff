//! `hici devices`.

use crate::args::ModelArgs;
use crate::backend::compiled_in;
use anyhow::Result;

pub fn run(m: &ModelArgs) -> Result<()> {
    let mut found = Vec::new();
    found.push(serde_json::json!({"backend": "ndarray", "device": "cpu", "available": cfg!(feature = "ndarray")}));
    #[cfg(feature = "wgpu")]
    {
        found.push(serde_json::json!({
            "backend": "wgpu",
            "device": "default adapter (Vulkan/Metal/DX12; CUBECL_WGPU_DEFAULT_DEVICE overrides)",
            "available": true,
        }));
    }
    #[cfg(feature = "cuda")]
    {
        match crate::backend::cuda_device_count() {
            Ok(n) => {
                for i in 0..n {
                    found.push(serde_json::json!({"backend": "cuda", "device": format!("cuda:{i}"), "available": true}));
                }
                if n == 0 {
                    found.push(serde_json::json!({"backend": "cuda", "device": "none", "available": false, "why": "no CUDA device found"}));
                }
            }
            Err(e) => found.push(serde_json::json!({"backend": "cuda", "device": "none", "available": false, "why": e.to_string()})),
        }
    }
    if m.json {
        println!(
            "{}",
            serde_json::json!({"compiled_in": compiled_in(), "devices": found})
        );
    } else {
        println!("compiled in: {}", compiled_in().join(", "));
        for d in found {
            println!(
                "  {:8} {}{}",
                d["backend"].as_str().unwrap_or(""),
                d["device"].as_str().unwrap_or(""),
                d.get("why")
                    .and_then(|w| w.as_str())
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
