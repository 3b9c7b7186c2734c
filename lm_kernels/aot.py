"""Compile every Triton kernel configuration ahead of time for sm_80 and sm_90, with no GPU, and
check what each one would use on the device.

    python -m lm_kernels.aot                      # the table, one line per problem, a summary line
    python -m lm_kernels.aot --json aot.json      # the same, every configuration as JSON

Triton's compiler needs no device for this: `triton.compile` on an `ASTSource` with a
`GPUTarget` runs the whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas), and the `cuobjdump` shipped
inside the Triton wheel reads the registers, stack and shared memory of the cubin. Checked for
every configuration that the launch functions can choose (see `configurations`):
  * it compiles;
  * shared memory within the architecture's per-block limit;
  * no register spills (stack frame and local memory both 0);
  * tensor-core instructions in every kernel that calls tl.dot: wgmma on sm_90 and mma on sm_80
    for 16-bit tiles, either for fp32 tiles with TF32 allowed; none at all in exact ("ieee") fp32;
  * asynchronous copies (cp.async, or TMA's cp.async.bulk) in every kernel whose loop streams
    K/V or Q/dO tiles, i.e. loads that the software pipeliner overlapped with the math.

Run it in a process without TRITON_INTERPRET=1: under the interpreter `triton.jit` returns
functions that cannot be compiled. Compiled kernels land in Triton's cache, so a second run
takes seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

ARCHS = (80, 90)
# Largest dynamic shared memory per block (CUDA programming guide, compute capabilities):
# 163 KB on sm_80 (A100), 227 KB on sm_90 (H100/H200).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
HEAD_DIMS = (64, 128)  # lm_kernels/attention.py's MAX_HEAD_DIM; others round up to these


@dataclass(frozen=True)
class Build:
    """One configuration of one kernel for one architecture."""

    kernel: str                 # "attention.fwd", "attention.bwd", "attention.dkdv", ...
    arch: int
    dtype: str                  # fp32, fp16, bf16
    constexprs: tuple           # ((name, value), ...)
    num_warps: int
    num_stages: int
    uses_dot: bool              # calls tl.dot on tiles of `dtype`
    streams_tiles: bool         # a loop streams K/V or Q/dO tiles: its loads must be async

    def label(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs if k != "PRECISION" or
                          self.dtype == "fp32")
        return (f"{self.kernel} sm_{self.arch} {self.dtype} {consts} "
                f"warps={self.num_warps} stages={self.num_stages}")


@dataclass
class Result:
    build: Build
    compiled: bool = False
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    tensor_cores: bool = False
    async_copy: bool = False
    problems: list[str] = field(default_factory=list)


def _kernel_modules():
    from lm_kernels import attention, cross_entropy

    return cross_entropy, attention


def configurations(archs=ARCHS) -> list[Build]:
    """Every configuration the launch functions of lm_kernels/ can choose on a GPU."""
    ce, va = _kernel_modules()
    builds = []
    for arch in archs:
        for dtype in DTYPES:
            # fp32 tiles are multiplied exactly by default, or in TF32 where the user allowed it
            # (torch.set_float32_matmul_precision): both are choosable, both are compiled.
            precisions = ("ieee", "tf32") if dtype == "fp32" else ("tf32",)
            for precision in precisions:
                for head_dim in HEAD_DIMS:
                    for causal in (True, False):
                        for name in va.KERNEL_NAMES:
                            for tile in va.tile_candidates(name, head_dim, dtype, arch):
                                builds.append(Build(
                                    f"attention.{name}", arch, dtype,
                                    (("HEAD_DIM", head_dim), ("CAUSAL", causal),
                                     ("PRECISION", precision), ("BLOCK_M", tile.block_m),
                                     ("BLOCK_N", tile.block_n), ("BLOCK_D", va.block_d(head_dim))),
                                    tile.num_warps, tile.num_stages, uses_dot=True,
                                    streams_tiles=True))
            for head_dim in HEAD_DIMS:
                builds.append(Build("attention.delta", arch, dtype,
                                    (("HEAD_DIM", head_dim), ("BLOCK_T", va.DELTA_BLOCK_T),
                                     ("BLOCK_D", va.block_d(head_dim))),
                                    4, 3, uses_dot=False, streams_tiles=False))
            for block_v, warps in ce.row_kernel_launches():
                for softcap in (False, True):
                    for grad in (False, True):
                        builds.append(Build("cross_entropy.rows", arch, dtype,
                                            (("HAS_SOFTCAP", softcap), ("COMPUTE_GRAD", grad),
                                             ("BLOCK_V", block_v)),
                                            warps, 3, uses_dot=False, streams_tiles=False))
    return builds


def _signature(build: Build):
    """(JITFunction, ASTSource) for a build, with the argument types and the 16-byte alignment
    hints that a real launch on [T, H, D] tensors with D a multiple of 16 gets."""
    from triton.compiler import ASTSource

    ce, va = _kernel_modules()
    family, name = build.kernel.split(".")
    if family == "attention":
        fn = va.KERNELS[name]
        data = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
        fp32_ptrs = {"LSE", "DELTA", "DQ_ACC"}  # DQ_ACC: the fused backward's dQ sums
        aligned_ints = {n for n in fn.arg_names if n.startswith("stride") and n != "stride_lt"}
        floats = {"qk_scale", "sm_scale"}
        int_ptrs = {"cu_seqlens": "*i32"}
    else:
        fn = ce.ROW_KERNEL
        data = {"logits_ptr"}
        fp32_ptrs = {"scale_ptr", "loss_ptr", "lse_ptr"}
        aligned_ints = set()
        floats = {"label_smoothing", "z_loss", "softcap"}
        int_ptrs = {"target_ptr": "*i64"}
    consts = dict(build.constexprs)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        aligned = True
        if arg in consts:
            signature[arg] = "constexpr"
            aligned = False
        elif arg in data:
            signature[arg] = "*" + DTYPES[build.dtype]
        elif arg in fp32_ptrs:
            signature[arg] = "*fp32"
        elif arg in int_ptrs:
            signature[arg] = int_ptrs[arg]
        elif arg in floats:
            signature[arg], aligned = "fp32", False
        else:
            signature[arg], aligned = "i32", arg in aligned_ints
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=consts, attrs=attrs)


def _cuobjdump_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    # "  REG:128 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 ..."
    line = next(line for line in out.splitlines() if "REG:" in line)
    fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return {key: int(fields[key.upper()]) for key in ("reg", "stack", "local")}


def check(build: Build) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    result = Result(build)
    try:
        kernel = triton.compile(_signature(build), target=GPUTarget("cuda", build.arch, 32),
                                options={"num_warps": build.num_warps,
                                         "num_stages": build.num_stages})
    except Exception as err:  # noqa: BLE001 - a compile error is a reported problem
        result.problems.append(f"does not compile: {str(err).strip().splitlines()[-1][:300]}")
        return result
    result.compiled = True
    usage = _cuobjdump_usage(kernel.asm["cubin"])
    result.registers, result.stack, result.local = usage["reg"], usage["stack"], usage["local"]
    result.shared = kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    # 16-bit tiles must use Hopper's wgmma on sm_90; TF32 tiles of fp32 kernels are small (fp32
    # is the checking precision, not the fast one) and get Ampere's mma.sync there, still tensor
    # cores.
    wgmma, mma = "wgmma.mma_async" in ptx, "mma.sync" in ptx
    result.tensor_cores = wgmma if build.arch >= 90 and build.dtype != "fp32" else (wgmma or mma)
    result.async_copy = "cp.async" in ptx  # cp.async.{ca,cg} and TMA's cp.async.bulk
    precision = dict(build.constexprs).get("PRECISION")
    if result.shared > SHARED_LIMIT[build.arch]:
        result.problems.append(f"shared memory {result.shared} B > {SHARED_LIMIT[build.arch]} B")
    if result.stack or result.local:
        result.problems.append(f"register spills: stack {result.stack} B, local {result.local} B "
                               f"({result.registers} registers)")
    exact_fp32 = build.dtype == "fp32" and precision == "ieee"
    if build.uses_dot and not exact_fp32 and not result.tensor_cores:
        result.problems.append("tl.dot without tensor-core instructions")
    if exact_fp32 and (result.tensor_cores or ".tf32" in ptx):
        result.problems.append("exact fp32 (ieee) compiled to TF32 tensor-core instructions")
    if build.streams_tiles and not result.async_copy:
        result.problems.append("tile-streaming loop without asynchronous copies (not pipelined)")
    return result


def run_all(builds: list[Build], jobs: int) -> list[Result]:
    if jobs <= 1:
        return [check(b) for b in builds]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(check, builds, chunksize=4))


def summary(results: list[Result]) -> str:
    good = sum(not r.problems for r in results)
    archs = "/".join(f"sm_{a}" for a in sorted({r.build.arch for r in results}))
    return (f"{good} of {len(results)} configurations compile for {archs} within limits "
            f"(shared memory, no spills, tensor cores, async copies)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write every configuration's result here")
    parser.add_argument("--kernel", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("lm_kernels.aot: unset TRITON_INTERPRET (the interpreter's functions cannot be "
              "compiled)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, without a warning
    builds = [b for b in configurations(tuple(args.arch)) if not args.kernel or args.kernel in b.kernel]
    results = run_all(builds, args.jobs)
    for r in results:
        for problem in r.problems:
            print(f"{r.build.label()}: {problem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r.build), **{k: v for k, v in asdict(r).items() if k != "build"}}
                       for r in results], f, indent=1)
    print(summary(results))
    return 0 if all(not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
