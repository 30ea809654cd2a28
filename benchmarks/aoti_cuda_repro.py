"""Minimal reproduction: load an AOTInductor package of one nn.Linear on CUDA (issue #27).

    python benchmarks/aoti_cuda_repro.py compile /tmp/linear.pt2   # export and package (works)
    python benchmarks/aoti_cuda_repro.py load /tmp/linear.pt2      # load and run: exit 139 (SIGSEGV) seen on
                                                                   # torch 2.11.0+cu130, H200
    python benchmarks/aoti_cuda_repro.py cpp-only /tmp/linear_src  # package_cpp_only: sources and CMakeLists

Each step in its own process, so a crash names the step; each prints one line when it gets through.

Seen on an H200 (torch 2.11.0+cu130, CUDA 13.0, 2026-12-03): compile and cpp-only exit 0; load exits 139.
faulthandler: the fault is inside `torch.export.pt2_archive._package._load_aoti` (the C++ loader). cuda-gdb's
backtrace, innermost frames first: libstdc++'s std::regex compiler (`_Compiler<regex_traits<char>>::_M_atom /
_M_alternative / _M_disjunction / _M_bracket_expression`, recursing) inside the package's own wrapper.so, called
from `torch::aot_inductor::parse_device_str`, from `AOTInductorModel::AOTInductorModel`, from
`AOTInductorModelContainerCreateWithDevice`, from `AOTIModelContainerRunnerCuda` (libtorch_cuda.so), from
`AOTIModelPackageLoader`. So the crash is in building a std::regex that parses the device string ("cuda:0"), in
code compiled into the package by the machine's C++ compiler, before any CUDA work: a libstdc++ mismatch between
the headers the wrapper.so was compiled against and the libstdc++ the process loaded is the first suspect (not
yet confirmed). The full log is in data/benchmarks/gpu/aoti-h200.log.
"""

import sys

import torch


def model_and_input() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 32).cuda().eval(), torch.randn(4, 64, device="cuda")


def main() -> None:
    step, path = sys.argv[1], sys.argv[2]
    model, x = model_and_input()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
    if step in ("compile", "cpp-only"):
        ep = torch.export.export(model, (x,))
        options = {"aot_inductor.package_cpp_only": True} if step == "cpp-only" else {}
        out = torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=options)
        print(f"{step}: wrote {out}", flush=True)
    elif step == "load":
        runner = torch._inductor.aoti_load_package(path)
        print("load: loaded", flush=True)
        diff = (runner(x) - model(x)).abs().max().item()
        print(f"load: ran, max |aoti - eager| = {diff:.2e}", flush=True)
    else:
        raise SystemExit(f"unknown step {step!r}: compile, load or cpp-only")


if __name__ == "__main__":
    main()
