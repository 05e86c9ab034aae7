"""CPU-specific lowering choices stay on CPU: the same function exported for GPU/TPU lowers without them.

`jax.export` lowers for a platform without needing its hardware, so these run on the CPU-only CI machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxlora
from jaxlora._src import merging


def _lora_grad():
    x, w, a, b = (jnp.full(s, 0.5) for s in ((8, 4), (4, 6), (4, 2), (2, 6)))
    fn = jax.jit(jax.grad(lambda x, a: jaxlora.lora_linear(x, x, w, None, a, b, 0.5).sum(), argnums=(0, 1)))
    return fn, (x, a)


@pytest.mark.parametrize(("platform", "barrier"), [("cpu", True), ("cuda", False), ("tpu", False)])
def test_optimization_barrier_only_on_cpu(platform, barrier):
    fn, args = _lora_grad()
    text = export.export(fn, platforms=[platform])(*args).mlir_module()
    assert ("stablehlo.optimization_barrier" in text) is barrier  # locations name this test: match the op


def test_low_rank_merge_product_is_outer_products_on_cpu_and_a_gemm_elsewhere():
    a, b = jnp.ones((64, 16)), jnp.ones((16, 32))
    fn = jax.jit(merging._matrix_product)
    cpu = export.export(fn, platforms=["cpu"])(a, b).mlir_module()
    gpu = export.export(fn, platforms=["cuda"])(a, b).mlir_module()
    assert "dot_general" not in cpu and cpu.count("stablehlo.multiply") == 16
    assert "dot_general" in gpu and "stablehlo.multiply" not in gpu


def test_platform_dependent_paths_compute_the_same_product():
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((64, 16), (16, 32)))
    expected = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(merging._matrix_product(a, b), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merging._summed_outer_products(a, b), expected, rtol=1e-5, atol=1e-5)
