"""Ahead-of-time compilation of Triton kernels for a real GPU target, on a machine without one
(triton ships ptxas): proves a kernel compiles for the GPU path and measures its shared memory."""

from __future__ import annotations

import inspect

SM80_SHARED_BYTES = 163 * 1024  # the most shared memory one program may use on an A100 (sm_80)


def compile_shared_bytes(kernel, kinds: dict[str, str], constants: dict, capability: int = 80,
                         **options) -> int:
    """Compile the `triton.jit` function `kernel` (or an autotuner wrapping one) for
    cuda:`capability` and return its shared memory in bytes.

    kinds: parameter name -> triton type ("*bf16", "*fp32", "i32", ...) for every parameter that
    is not in `constants`; parameters missing from both default to "i32".
    options: compile options (num_warps, num_stages, ...).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    jit_fn = kernel
    while not isinstance(jit_fn, JITFunction):  # autotuners / heuristics wrap the jit function
        jit_fn = jit_fn.fn
    names = list(inspect.signature(jit_fn.fn).parameters)
    signature = {n: "constexpr" if n in constants else kinds.get(n, "i32") for n in names}
    source = ASTSource(fn=jit_fn, signature=signature,
                       constexprs={(names.index(n),): value for n, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    return compiled.metadata.shared
