"""Compile greg_step kernel specializations for a GPU target, no GPU needed (used by
test_triton_compile.py in a process of its own: the interpreter must be off for the compiler).

stdin: JSON [{"arch": 90, "spec": {constexpr name: value, "ELEM": "fp32", "num_warps": 4}}, ...]
stdout: JSON, one report per entry: registers, stack bytes (spills) and the kinds of global loads
and stores in the PTX.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from greg_fast.kernels import greg_step

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
FLOAT_ARGS = {"scores_ptr", "lam_kept_ptr", "lam_sel_ptr", "hyper_ptr"}
BOOL_ARGS = {"mask_flag_ptr", "skip_flag_ptr"}


def compile_one(spec: dict, arch: int) -> dict:
    kernel = greg_step._greg_step_kernel
    spec = dict(spec)
    num_warps = spec.pop("num_warps")
    spec["ELEM"] = getattr(tl, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[spec["ELEM"]])
    names = kernel.arg_names
    signature = {n: ("*fp32" if n in FLOAT_ARGS else "*i1" if n in BOOL_ARGS else "*i64") for n in names
                 if n not in spec}
    signature.update({n: "constexpr" for n in spec})
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in spec.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", fh.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    ptx = compiled.asm["ptx"]
    return {"registers": regs, "stack": stack,
            "loads": sorted(set(re.findall(r"ld\.global[\w.]*", ptx))),
            "stores": sorted(set(re.findall(r"st\.global[\w.]*", ptx)))}


def main() -> None:
    json.dump([compile_one(job["spec"], job["arch"]) for job in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()
