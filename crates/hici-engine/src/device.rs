//! Device selection: only the backends compiled in are offered, and the macro that binds a
//! backend type to a [`DeviceChoice`] at run time.

use anyhow::Result;
use std::fmt;
use std::str::FromStr;

/// A device to run on (`ndarray`/`cpu`, `wgpu[:API][:N]`, `cuda[:N]` as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CPU through burn-ndarray (always compiled by default).
    #[default]
    Ndarray,
    /// wgpu: a graphics API and adapter, or burn's default choice.
    Wgpu(WgpuSelect),
    /// CUDA device N.
    Cuda(usize),
}

/// The graphics APIs `--device wgpu:API` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuApi {
    Vulkan,
    Metal,
    Dx12,
    /// OpenGL / OpenGL ES (`gl`).
    Gl,
}

impl WgpuApi {
    const ALL: [(&'static str, WgpuApi); 4] = [
        ("vulkan", WgpuApi::Vulkan),
        ("metal", WgpuApi::Metal),
        ("dx12", WgpuApi::Dx12),
        ("gl", WgpuApi::Gl),
    ];

    /// The name `--device` uses.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .expect("every API is named")
    }
}

/// Which wgpu adapter: `api` None = the API burn picks on this platform (Vulkan on Linux and
/// Windows, Metal on macOS); `index` None = burn's default adapter of that API, Some(N) = the
/// N-th adapter of that API in wgpu's enumeration order (the order `hici devices` lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WgpuSelect {
    pub api: Option<WgpuApi>,
    pub index: Option<usize>,
}

/// Parses what follows `wgpu:` (`vulkan`, `vulkan:1`, `1`).
fn parse_wgpu(rest: &str, whole: &str) -> Result<WgpuSelect, String> {
    let apis = WgpuApi::ALL.map(|(n, _)| n).join("|");
    let index = |n: &str| {
        n.parse::<usize>().map_err(|_| {
            format!("bad wgpu adapter index `{n}` in `{whole}` (want wgpu[:{apis}][:N])")
        })
    };
    let mut parts = rest.split(':');
    let first = parts.next().unwrap_or("");
    let second = parts.next();
    if parts.next().is_some() {
        return Err(format!("bad device `{whole}` (want wgpu[:{apis}][:N])"));
    }
    match WgpuApi::ALL
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(first))
    {
        Some((_, api)) => Ok(WgpuSelect {
            api: Some(*api),
            index: second.map(index).transpose()?,
        }),
        None if second.is_none() && first.chars().all(|c| c.is_ascii_digit()) => Ok(WgpuSelect {
            api: None,
            index: Some(index(first)?),
        }),
        None => Err(format!(
            "unknown graphics API `{first}` in `{whole}` (want one of {apis})"
        )),
    }
}

/// The backends this binary was built with, as `--device` spells them. `cpu` (the default)
/// names the fastest CPU backend compiled in, today `ndarray`.
pub fn compiled_in() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "ndarray") {
        v.push("cpu");
        v.push("ndarray");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu[:vulkan|metal|dx12|gl][:N]");
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
            "wgpu" => DeviceChoice::Wgpu(WgpuSelect::default()),
            "cuda" => DeviceChoice::Cuda(0),
            _ => {
                if let Some(n) = s.strip_prefix("cuda:") {
                    DeviceChoice::Cuda(
                        n.parse()
                            .map_err(|_| format!("bad CUDA device index `{n}` in `{s}`"))?,
                    )
                } else if let Some(rest) = s.strip_prefix("wgpu:") {
                    DeviceChoice::Wgpu(parse_wgpu(rest, s)?)
                } else {
                    return Err(format!("unknown device `{s}` (compiled in: {avail})"));
                }
            }
        };
        let ok = match choice {
            DeviceChoice::Ndarray => cfg!(feature = "ndarray"),
            DeviceChoice::Wgpu(_) => cfg!(feature = "wgpu"),
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
            DeviceChoice::Wgpu(w) => {
                write!(f, "wgpu")?;
                if let Some(api) = w.api {
                    write!(f, ":{}", api.name())?;
                }
                if let Some(i) = w.index {
                    write!(f, ":{i}")?;
                }
                Ok(())
            }
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

/// What wgpu reports for every adapter it can see, in its enumeration order, or an error when
/// enumerating panics (a broken driver).
#[cfg(feature = "wgpu")]
pub fn wgpu_adapters() -> Result<Vec<wgpu::AdapterInfo>> {
    let probe = || {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(|a| a.get_info())
            .collect::<Vec<_>>()
    };
    quiet_catch(probe)
        .ok_or_else(|| anyhow::anyhow!("no wgpu device: wgpu failed while enumerating adapters"))
}

/// The wgpu backend of a selection (burn's platform default when none is named).
#[cfg(feature = "wgpu")]
pub fn wgpu_backend(api: Option<WgpuApi>) -> wgpu::Backend {
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    match api {
        None => AutoGraphicsApi::backend(),
        Some(WgpuApi::Vulkan) => wgpu::Backend::Vulkan,
        Some(WgpuApi::Metal) => wgpu::Backend::Metal,
        Some(WgpuApi::Dx12) => wgpu::Backend::Dx12,
        Some(WgpuApi::Gl) => wgpu::Backend::Gl,
    }
}

/// The `--device` text that selects the `index`-th adapter of `backend` (what `hici devices`
/// prints), or None for an API `--device` cannot name.
#[cfg(feature = "wgpu")]
pub fn wgpu_select_text(backend: wgpu::Backend, index: usize) -> Option<String> {
    let api = WgpuApi::ALL
        .iter()
        .find(|(_, a)| wgpu_backend(Some(*a)) == backend)?;
    Some(format!("--device wgpu:{}:{index}", api.0))
}

/// Resolves a wgpu selection to burn's device without touching it: checks that an adapter of
/// the API (and index) exists, naming what was found otherwise (burn panics in its device
/// thread instead).
///
/// burn names adapters by type and index within the type (`DiscreteGpu(n)`, `Cpu`, ...); the
/// N-th adapter of the API is mapped to that form.
#[cfg(feature = "wgpu")]
pub fn resolve_wgpu(sel: WgpuSelect) -> Result<burn::backend::wgpu::WgpuDevice> {
    use burn::backend::wgpu::WgpuDevice;
    use wgpu::DeviceType;
    let backend = wgpu_backend(sel.api);
    let infos = wgpu_adapters()?;
    let of_api: Vec<&wgpu::AdapterInfo> = infos.iter().filter(|i| i.backend == backend).collect();
    let found = || {
        if infos.is_empty() {
            "none".to_string()
        } else {
            infos
                .iter()
                .map(|i| format!("{} ({:?})", i.name, i.backend))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let what = match sel.api {
        Some(api) => format!("a {api:?} adapter"),
        None => format!(
            "a {backend:?} adapter (burn's graphics API here; pick another with --device wgpu:API)"
        ),
    };
    if of_api.is_empty() {
        anyhow::bail!(
            "no wgpu device: needs {what}, found {} (on Linux without a GPU install \
             mesa-vulkan-drivers for lavapipe; `hici devices` lists adapters)",
            found()
        );
    }
    let device = match sel.index {
        None => WgpuDevice::DefaultDevice,
        Some(n) => {
            let Some(info) = of_api.get(n) else {
                anyhow::bail!(
                    "no wgpu device {n} for {backend:?}: {} adapter(s) of that API ({}); \
                     indices start at 0",
                    of_api.len(),
                    of_api
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let same = |t: DeviceType| of_api[..n].iter().filter(|i| i.device_type == t).count();
            let count = |t: DeviceType| of_api.iter().filter(|i| i.device_type == t).count();
            match info.device_type {
                DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(same(DeviceType::DiscreteGpu)),
                DeviceType::IntegratedGpu => {
                    WgpuDevice::IntegratedGpu(same(DeviceType::IntegratedGpu))
                }
                DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(same(DeviceType::VirtualGpu)),
                DeviceType::Cpu if same(DeviceType::Cpu) == 0 => WgpuDevice::Cpu,
                DeviceType::Other => {
                    // burn takes the k-th "other" adapter when a type has at most k adapters
                    let k = same(DeviceType::Other);
                    if count(DeviceType::DiscreteGpu) <= k {
                        WgpuDevice::DiscreteGpu(k)
                    } else if count(DeviceType::IntegratedGpu) <= k {
                        WgpuDevice::IntegratedGpu(k)
                    } else {
                        anyhow::bail!(
                            "wgpu adapter {n} ({}) cannot be selected through burn",
                            info.name
                        )
                    }
                }
                _ => anyhow::bail!(
                    "wgpu adapter {n} ({}) cannot be selected through burn (burn picks only the \
                     first CPU adapter)",
                    info.name
                ),
            }
        }
    };
    Ok(device)
}

/// [`resolve_wgpu`], then burn's wgpu runtime initialised on that API and adapter (burn
/// initialises its platform API lazily when none is named). Call once per process and device.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(sel: WgpuSelect) -> Result<burn::backend::wgpu::WgpuDevice> {
    use burn::backend::wgpu::{graphics, init_setup, RuntimeOptions};
    let device = resolve_wgpu(sel)?;
    let backend = wgpu_backend(sel.api);
    let options = RuntimeOptions::default;
    let init = || match sel.api {
        // burn initialises its platform API lazily on first use
        None => {}
        Some(WgpuApi::Vulkan) => {
            init_setup::<graphics::Vulkan>(&device, options());
        }
        Some(WgpuApi::Metal) => {
            init_setup::<graphics::Metal>(&device, options());
        }
        Some(WgpuApi::Dx12) => {
            init_setup::<graphics::Dx12>(&device, options());
        }
        Some(WgpuApi::Gl) => {
            init_setup::<graphics::OpenGl>(&device, options());
        }
    };
    quiet_catch(init).ok_or_else(|| {
        anyhow::anyhow!("no wgpu device: burn failed to open {device:?} on {backend:?}")
    })?;
    Ok(device)
}

/// Checks a wgpu or CUDA choice before any burn call touches the device.
pub fn check_available(choice: DeviceChoice) -> Result<()> {
    match choice {
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu(sel) => resolve_wgpu(sel).map(|_| ()),
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
            ($crate::device::DeviceChoice::Wgpu(sel), true) => {
                type $B = burn::backend::Wgpu<f32, i32>;
                let $dev = $crate::device::wgpu_device(sel)?;
                $body
            }
            #[cfg(feature = "wgpu")]
            ($crate::device::DeviceChoice::Wgpu(sel), false) => {
                type $B = burn::backend::wgpu::CubeBackend<
                    burn::backend::wgpu::WgpuRuntime,
                    f32,
                    i32,
                    u32,
                >;
                let $dev = $crate::device::wgpu_device(sel)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_text_round_trips_and_bad_text_is_named() {
        let sel = |api, index| DeviceChoice::Wgpu(WgpuSelect { api, index });
        let cases = [
            ("cpu", DeviceChoice::Ndarray, "ndarray"),
            ("cuda:3", DeviceChoice::Cuda(3), "cuda:3"),
            ("wgpu", sel(None, None), "wgpu"),
            ("wgpu:1", sel(None, Some(1)), "wgpu:1"),
            (
                "wgpu:vulkan",
                sel(Some(WgpuApi::Vulkan), None),
                "wgpu:vulkan",
            ),
            ("wgpu:GL:2", sel(Some(WgpuApi::Gl), Some(2)), "wgpu:gl:2"),
            (
                "wgpu:dx12:0",
                sel(Some(WgpuApi::Dx12), Some(0)),
                "wgpu:dx12:0",
            ),
            ("wgpu:metal", sel(Some(WgpuApi::Metal), None), "wgpu:metal"),
        ];
        for (text, want, shown) in cases {
            if (matches!(want, DeviceChoice::Wgpu(_)) && !cfg!(feature = "wgpu"))
                || (matches!(want, DeviceChoice::Cuda(_)) && !cfg!(feature = "cuda"))
            {
                assert!(text.parse::<DeviceChoice>().is_err(), "{text}");
                continue;
            }
            let got: DeviceChoice = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), shown);
            assert_eq!(shown.parse::<DeviceChoice>().unwrap(), want);
        }
        for (text, says) in [
            ("wgpu:vulkn", "vulkn"),
            ("wgpu:vulkan:x", "`x`"),
            ("wgpu:vulkan:1:2", "wgpu:vulkan:1:2"),
            ("wgpu:-1", "-1"),
            ("cuda:one", "`one`"),
            ("tpu", "unknown device `tpu`"),
        ] {
            let e = text.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
