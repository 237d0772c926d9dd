// Links the system OpenBLAS (Debian: libopenblas-dev). It provides the CBLAS symbols used by
// ndarray's `blas` feature and by `src/linalg/`, LAPACK's `xsyevr`, and `openblas_set_num_threads`.
//
// The GPU: `cfg(eva_gpu)` is set when the CUDA backend is compiled, against the driver (feature
// `cuda`) or against the emulated device (feature `cuda-emu`, a test device). With `cuda-emu` this
// script also compiles the CUDA kernels (`src/device/cuda/kernels.cu`) for the host with the
// system's C++ compiler (the emulator's executor, `src/device/emu/`).
use std::env;

fn main() {
    println!("cargo:rustc-link-lib=openblas");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(eva_gpu)");
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let emu = env::var_os("CARGO_FEATURE_CUDA_EMU").is_some();
    if cuda && emu {
        eprintln!(
            "error: features `cuda` and `cuda-emu` are two implementations of the same GPU \
             runtime (the driver, or the emulated test device): enable one of them (`nccl` \
             enables `cuda`)"
        );
        std::process::exit(1);
    }
    if cuda || emu {
        println!("cargo:rustc-cfg=eva_gpu");
    }
    #[cfg(feature = "cuda-emu")]
    emu::build();
}

/// The emulated device's kernels: every `extern "C" __global__` function of a `.cu` source
/// compiled for the host with `src/device/emu/shim.h`, behind a generated table of trampolines
/// that the executor (`src/device/emu/executor.cpp`) launches by name.
#[cfg(feature = "cuda-emu")]
mod emu {
    use std::env;
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};

    /// One kernel parameter: its C type (without `__restrict__`) and how an 8-byte argument slot
    /// becomes it.
    struct Param {
        ty: String,
        kind: char,
    }

    struct Kernel {
        name: String,
        params: Vec<Param>,
    }

    pub fn build() {
        let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it"));
        let dir = root.join("src/device/emu");
        let sources = [
            // eva's kernels: the table the emulated runtime launches.
            (
                root.join("src/device/cuda/kernels.cu"),
                "eva_emu_kernels",
                "eva_emu_k_",
            ),
            // The executor's own test kernels (a broken barrier, races, ...).
            (
                dir.join("test_kernels.cu"),
                "eva_emu_test_kernels",
                "eva_emu_t_",
            ),
        ];
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            // CUDA compiles eva's kernels with `--fmad=false`: `a * b + c` rounds twice.
            .flag("-ffp-contract=off")
            .flag("-fno-exceptions")
            .flag("-fno-rtti")
            // CUDA's idioms (`threadIdx.x < s` with an int `s`) and the shim's unused helpers.
            .flag("-Wno-sign-compare")
            .flag("-Wno-unused-function")
            .flag("-Wno-unused-parameter")
            // The executor uses no C++ library (pthread, mmap and libm only).
            .cpp_link_stdlib(None)
            .include(&dir)
            .file(dir.join("executor.cpp"));
        for f in ["executor.cpp", "executor.h", "shim.h"] {
            println!("cargo:rerun-if-changed={}", dir.join(f).display());
        }
        for (src, table, prefix) in &sources {
            println!("cargo:rerun-if-changed={}", src.display());
            let text = std::fs::read_to_string(src)
                .unwrap_or_else(|e| panic!("cuda-emu: cannot read {}: {e}", src.display()));
            let kernels = parse(&text, src);
            let stem = src.file_stem().expect("a file name").to_string_lossy();
            let unit = out.join(format!("emu_{stem}.cpp"));
            std::fs::write(&unit, translation_unit(src, &kernels, table, prefix))
                .expect("OUT_DIR is writable");
            build.file(unit);
        }
        build.compile("eva_emu");
    }

    /// The source without its comments (kernels.cu has no string literals but `extern "C"`).
    fn strip_comments(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("//") {
                rest = r.find('\n').map_or("", |i| &r[i..]);
            } else if let Some(r) = rest.strip_prefix("/*") {
                rest = r.find("*/").map_or("", |i| &r[i + 2..]);
                out.push(' ');
            } else if let Some(r) = rest.strip_prefix('"') {
                let end = r.find('"').map_or(r.len(), |i| i + 1);
                out.push('"');
                out.push_str(&r[..end]);
                rest = &r[end..];
            } else {
                let c = rest.chars().next().expect("not empty");
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        out
    }

    /// Every `extern "C" __global__ void NAME(params)` of a source, in order.
    fn parse(text: &str, src: &Path) -> Vec<Kernel> {
        let code = strip_comments(text);
        let marker = "extern \"C\" __global__ void ";
        let mut kernels = Vec::new();
        for piece in code.split(marker).skip(1) {
            let open = piece.find('(').unwrap_or_else(|| {
                panic!("cuda-emu: {}: a kernel without parameters", src.display())
            });
            let name = piece[..open].trim().to_string();
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "cuda-emu: {}: cannot read the kernel name {name:?}",
                src.display()
            );
            let close = piece[open..]
                .find(')')
                .unwrap_or_else(|| panic!("cuda-emu: {}: kernel {name}: no ')'", src.display()));
            let list = &piece[open + 1..open + close];
            let params = list
                .split(',')
                .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|p| !p.is_empty() && p != "void")
                .map(|p| param(&p, &name, src))
                .collect();
            kernels.push(Kernel { name, params });
        }
        assert!(
            !kernels.is_empty(),
            "cuda-emu: {}: no `extern \"C\" __global__ void` kernel",
            src.display()
        );
        kernels
    }

    /// A parameter's type and slot kind from its declaration (`const float* __restrict__ x`).
    fn param(decl: &str, kernel: &str, src: &Path) -> Param {
        let decl = decl.replace('*', " * ");
        let mut words: Vec<&str> = decl
            .split_whitespace()
            .filter(|w| *w != "__restrict__")
            .collect();
        let name = words.pop().unwrap_or_default();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !words.is_empty(),
            "cuda-emu: {}: kernel {kernel}: cannot read the parameter `{decl}`",
            src.display()
        );
        let ty = words.join(" ").replace(" *", "*");
        let bare: Vec<&str> = words
            .iter()
            .copied()
            .filter(|w| *w != "const" && *w != "volatile")
            .collect();
        let kind = if words.contains(&"*") {
            'P'
        } else {
            match bare.join(" ").as_str() {
                "unsigned long long" | "unsigned long long int" | "long long"
                | "long long int" | "size_t" => 'U',
                "int" | "unsigned int" | "unsigned" => 'I',
                "float" => 'F',
                "double" => 'D',
                other => panic!(
                    "cuda-emu: {}: kernel {kernel}: parameter type `{other}` has no argument slot in the emulator (add it to build.rs)",
                    src.display()
                ),
            }
        };
        Param { ty, kind }
    }

    /// The generated C++: the source inside an unnamed namespace (its helpers stay local to the
    /// unit), its kernels renamed with `prefix` (their C symbols would otherwise be global names
    /// such as `add`), and the table of trampolines.
    fn translation_unit(src: &Path, kernels: &[Kernel], table: &str, prefix: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "// Generated by build.rs from {}.", src.display());
        s.push_str("#include \"shim.h\"\n#include \"executor.h\"\n");
        for k in kernels {
            let _ = writeln!(s, "#define {0} {prefix}{0}", k.name);
        }
        let _ = writeln!(s, "namespace {{\n#include \"{}\"\n}}", src.display());
        s.push_str("namespace {\n");
        for (i, k) in kernels.iter().enumerate() {
            let args: Vec<String> = k
                .params
                .iter()
                .enumerate()
                .map(|(j, p)| match p.kind {
                    'P' => format!("({})(uintptr_t)a[{j}]", p.ty),
                    'U' => format!("({})a[{j}]", p.ty),
                    'I' => format!("({})(unsigned int)a[{j}]", p.ty),
                    'F' => format!("__uint_as_float((unsigned int)a[{j}])"),
                    'D' => format!("__longlong_as_double((long long)a[{j}])"),
                    _ => unreachable!(),
                })
                .collect();
            let _ = writeln!(
                s,
                "void run_{i}(const unsigned long long* a) {{ (void)a; {}({}); }}",
                k.name,
                args.join(", ")
            );
        }
        s.push_str("}\n");
        let _ = writeln!(s, "extern \"C\" const EvaEmuKernel {table}[] = {{");
        for (i, k) in kernels.iter().enumerate() {
            let kinds: String = k.params.iter().map(|p| p.kind).collect();
            let _ = writeln!(
                s,
                "    {{\"{}\", \"{kinds}\", {}, run_{i}}},",
                k.name,
                k.params.len()
            );
        }
        s.push_str("};\n");
        let _ = writeln!(s, "extern \"C\" const int {table}_len = {};", kernels.len());
        s
    }
}
