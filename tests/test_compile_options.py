"""Which programs compile with XLA's Eigen dots on CPU (``jdisagg.programs.compile_program``): those whose
matmuls have few rows (decode), where YNNPACK, jaxlib's default for CPU dots, measured slower; larger
programs, and every other platform, keep the defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdisagg.programs import FEW_ROWS, compile_program


def _matmul(rows: int) -> jax.stages.Lowered:
    return jax.jit(lambda x, w: x @ w).lower(jnp.ones((rows, 64)), jnp.ones((64, 128)))


def _uses_ynnpack(compiled: jax.stages.Compiled) -> bool:
    return "ynn_fusion" in compiled.as_text()


def test_few_row_programs_run_xlas_own_dots_on_cpu():
    """Whatever this jaxlib's default (0.10 fuses the dot into YNNPACK; one without YNNPACK does not), a
    few-row program on CPU runs XLA's own dot."""
    compiled = compile_program(_matmul(FEW_ROWS), platform="cpu", rows=FEW_ROWS)
    assert not _uses_ynnpack(compiled)
    assert " dot(" in compiled.as_text()


def test_larger_programs_and_other_platforms_keep_the_defaults():
    for rows, platform in ((FEW_ROWS + 1, "cpu"), (1, "gpu"), (1, "tpu")):
        lowered = _matmul(rows)
        assert compile_program(lowered, platform=platform, rows=rows).as_text() == lowered.compile().as_text()
