//! Device selection: only the backends compiled in are offered, and the macro that binds a
//! backend type to a [`DeviceChoice`] at run time.

use anyhow::Result;
use std::fmt;
use std::str::FromStr;

/// A device to run on (`ndarray`/`cpu`, `wgpu`, `cuda[:N]` as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CPU through burn-ndarray (always compiled by default).
    #[default]
    Ndarray,
    /// wgpu (Vulkan / Metal / DX12), default adapter.
    Wgpu,
    /// CUDA device N.
    Cuda(usize),
}

/// The backends this binary was built with.
pub fn compiled_in() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "ndarray") {
        v.push("ndarray");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda[:N]");
    }
    v
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let avail = compiled_in().join(", ");
        let choice = match s {
            "ndarray" | "cpu" => DeviceChoice::Ndarray,
            "wgpu" => DeviceChoice::Wgpu,
            "cuda" => DeviceChoice::Cuda(0),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => DeviceChoice::Cuda(
                    n.parse()
                        .map_err(|_| format!("bad CUDA device index `{n}` in `{s}`"))?,
                ),
                None => return Err(format!("unknown device `{s}` (compiled in: {avail})")),
            },
        };
        let ok = match choice {
            DeviceChoice::Ndarray => cfg!(feature = "ndarray"),
            DeviceChoice::Wgpu => cfg!(feature = "wgpu"),
            DeviceChoice::Cuda(_) => cfg!(feature = "cuda"),
        };
        if !ok {
            return Err(format!(
                "device `{s}` is not compiled into this binary (compiled in: {avail}; rebuild \
                 with --features wgpu or --features cuda)"
            ));
        }
        Ok(choice)
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Ndarray => write!(f, "ndarray"),
            DeviceChoice::Wgpu => write!(f, "wgpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Number of CUDA devices, or an error when the driver library is missing. burn panics when
/// libcuda cannot be loaded; the probe catches that panic with a silent hook.
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> Result<usize> {
    match quiet_catch(cudarc::driver::CudaContext::device_count) {
        Some(Ok(n)) => Ok(n.max(0) as usize),
        Some(Err(e)) => anyhow::bail!("no CUDA device: {e:?}"),
        None => {
            anyhow::bail!("no CUDA device: the CUDA driver library (libcuda.so) was not found")
        }
    }
}

/// Runs `f`, turning a panic into `None` without printing it (burn and cudarc panic when a
/// driver library is missing).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn quiet_catch<T>(f: impl FnOnce() -> T) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.ok()
}

/// Checks that wgpu finds an adapter of the graphics API burn's wgpu backend uses here (burn
/// panics in its device thread otherwise), naming what it found instead.
#[cfg(feature = "wgpu")]
pub fn check_wgpu() -> Result<()> {
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    let api = AutoGraphicsApi::backend();
    let probe = || {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(|a| a.get_info())
            .collect::<Vec<_>>()
    };
    let Some(infos) = quiet_catch(probe) else {
        anyhow::bail!("no wgpu device: wgpu failed while enumerating adapters");
    };
    if infos.iter().any(|i| i.backend == api) {
        return Ok(());
    }
    let found = if infos.is_empty() {
        "none".to_string()
    } else {
        infos
            .iter()
            .map(|i| format!("{} ({:?})", i.name, i.backend))
            .collect::<Vec<_>>()
            .join(", ")
    };
    anyhow::bail!(
        "no wgpu device: burn's wgpu backend needs a {api:?} adapter here, found {found} (on \
         Linux without a GPU install mesa-vulkan-drivers for lavapipe; `hici devices` lists \
         adapters)"
    )
}

/// Checks a wgpu or CUDA choice before any burn call touches the device.
pub fn check_available(choice: DeviceChoice) -> Result<()> {
    match choice {
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => check_wgpu(),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(i) => {
            let n = cuda_device_count()?;
            if i >= n {
                anyhow::bail!("no CUDA device {i}: {n} device(s) found");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Runs `$body` with `$B` bound to the backend type and `$dev` to its device. `$fused`
/// selects burn's fusion layer on wgpu/CUDA (`Fusion<CubeBackend<..>>`) or the plain
/// `CubeBackend`; it is ignored on ndarray.
#[macro_export]
macro_rules! with_backend {
    ($choice:expr, $fused:expr, |$B:ident, $dev:ident| $body:expr) => {{
        match ($choice, $fused) {
            #[cfg(feature = "ndarray")]
            ($crate::device::DeviceChoice::Ndarray, _) => {
                type $B = burn::backend::NdArray<f32>;
                let $dev = burn::backend::ndarray::NdArrayDevice::Cpu;
                $body
            }
            #[cfg(feature = "wgpu")]
            ($crate::device::DeviceChoice::Wgpu, true) => {
                type $B = burn::backend::Wgpu<f32, i32>;
                let $dev = burn::backend::wgpu::WgpuDevice::DefaultDevice;
                $body
            }
            #[cfg(feature = "wgpu")]
            ($crate::device::DeviceChoice::Wgpu, false) => {
                type $B = burn::backend::wgpu::CubeBackend<
                    burn::backend::wgpu::WgpuRuntime,
                    f32,
                    i32,
                    u32,
                >;
                let $dev = burn::backend::wgpu::WgpuDevice::DefaultDevice;
                $body
            }
            #[cfg(feature = "cuda")]
            ($crate::device::DeviceChoice::Cuda(i), true) => {
                type $B = burn::backend::Cuda<f32, i32>;
                let $dev = burn::backend::cuda::CudaDevice::new(i);
                $body
            }
            #[cfg(feature = "cuda")]
            ($crate::device::DeviceChoice::Cuda(i), false) => {
                type $B = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
                let $dev = burn::backend::cuda::CudaDevice::new(i);
                $body
            }
            #[allow(unreachable_patterns)]
            (other, _) => anyhow::bail!("device {other} is not compiled in"),
        }
    }};
}

/// Runs `f` on a thread of the CPU backend's compute pool (rayon's) and returns its result.
///
/// burn-ndarray splits its parallel ops (the decode products among them) over that pool. Called
/// from any other thread, each such op is handed to the pool while the caller waits, so every
/// op pays a hand-over and a wake-up, and the caller competes with the pool's threads for the
/// cores. Running the whole computation on a pool thread makes those ops split their work with
/// the thread already running. Without the CPU backend `f` runs where it is.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "ndarray")]
    {
        rayon::scope(|_| f())
    }
    #[cfg(not(feature = "ndarray"))]
    {
        f()
    }
}
