"""A synthetic results dictionary, assembled the way bench.runner.run assembles one."""

from bench import impls
from bench.runner import Config, assemble, impl_entry, new_record
from bench.shapes import bytes_moved, parse_shapes

SHAPES = "2048x4096,256x4096"
OPS = ["fwd", "fused", "fwdbwd"]
# Made-up cold device times (us) of the bf16 forward at 2048x4096, scaled by bytes moved;
# warm is 60 % of cold.
COLD = {
    "torch_eager": 60.0,
    "torch_rms_norm": 30.0,
    "accel_torch": 20.0,
    "jax_xla": 25.0,
    "flax_linen": 28.0,
    "accel_jax": 21.0,
}
MISSING = {"liger": "liger_kernel.ops.rms_norm not installed", "torch_compile": None}


def synthetic_results(kind: str = "cuda") -> dict:
    cfg = Config(shapes=parse_shapes(SHAPES), ops=OPS, dtype="bf16")
    device = {
        "kind": kind,
        "name": "Fake GPU" if kind == "cuda" else "x86_64",
        "l2_bytes": 50 << 20,
    }
    infos = [
        impl_entry(i, MISSING.get(i.name) if i.name == "liger" else None) for i in impls.REGISTRY
    ]
    records, floors, host = [], [], []
    for shape in cfg.shapes:
        for op in OPS:
            nbytes = bytes_moved(op, shape, "bf16")
            for fw in ("torch", "jax"):
                floors.append(
                    {
                        "framework": fw,
                        "shape": shape.name,
                        "op": op,
                        "bytes": nbytes,
                        "copied_bytes": nbytes,
                        "cold_us": 16.7 * nbytes / 33554432,
                        "warm_us": 8.6 * nbytes / 33554432,
                    }
                )
            for impl in impls.REGISTRY:
                rec = new_record(impl, shape, op, "bf16")
                records.append(rec)
                if impl.name == "liger":
                    rec.update(status="missing", reason=MISSING["liger"])
                    continue
                if impl.name == "torch_compile" and op == "fwdbwd":
                    rec.update(status="error", reason="RuntimeError: fake failure")
                    continue
                cold = COLD.get(impl.name, 40.0) * nbytes / 33554432
                rec.update(
                    cold_us=cold if kind == "cuda" else None, warm_us=0.6 * cold, first_call_s=0.5
                )
                if op == "fwdbwd":
                    rec["peak_mem_bytes"] = 3 * shape.numel * 2
                if impl.framework == "jax":
                    rec["kernels"] = ["fusion"]
    for op in OPS:
        for impl in impls.REGISTRY:
            if impl.name != "liger":
                host.append(
                    {
                        "impl": impl.name,
                        "label": impl.label,
                        "framework": impl.framework,
                        "op": op,
                        "shape": "1x4096",
                        "calls": 10,
                        "us_per_call": 12.5,
                        "status": "ok",
                        "reason": None,
                    }
                )
    big = {
        "buffer_bytes": 1 << 30,
        "bytes_moved": 2 << 30,
        "us": 700.0,
        "gbps": (2 << 30) / 700.0 / 1e3,
    }
    return assemble(cfg, device, infos, big, floors, records, host, ["a note"])
