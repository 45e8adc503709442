"""torch.compile under FlatLora.perturb(): eager results, one graph, no recompile from step to step.

The aot_eager backend traces what inductor traces (dynamo's graph, then AOT autograd's forward and
backward graphs through the custom ops' fake and autograd registrations) without generating
code, so the test stays within a minute on a CPU; notes/ measured inductor with the same design.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from flatlora_diffusion import FlatLora
from tests.flat.test_conv import conv_loss, conv_toy
from tests.flat.test_flat_lora import grads_of
from tests.helpers import add_test_loras, unet_inputs, unet_loss


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _steps(model, compiled, flat, loss_of, steps):
    """Eager and compiled loss and grads of `steps` optimizer steps; recompiling after step 0 raises."""
    results = []
    for step in range(steps):
        with flat.perturb(step):
            eager = grads_of(model, lambda m, step=step: loss_of(m, step))
        with flat.perturb(step), torch._dynamo.config.patch(error_on_recompile=step > 0):
            results.append((eager, grads_of(model, lambda m, step=step: loss_of(compiled, step))))
    return results


def _assert_close(results, rtol, atol):
    for (loss, grads), (compiled_loss, compiled_grads) in results:
        assert torch.allclose(loss, compiled_loss, rtol=rtol, atol=atol)
        assert grads.keys() == compiled_grads.keys()
        for key in grads:
            assert torch.allclose(grads[key], compiled_grads[key], rtol=rtol, atol=atol), key


def test_compiled_tiny_unet_gives_eager_results_without_recompiling(tiny_pipe, fresh_dynamo):
    unet = add_test_loras(tiny_pipe, text_encoders=False).unet
    flat = FlatLora({"unet": unet}, sigma=0.2, schedule="constant", seed=1)
    compiled = torch.compile(unet, backend="aot_eager")
    results = _steps(unet, compiled, flat, lambda m, step: unet_loss(m, unet_inputs(unet, seed=step)), 2)
    _assert_close(results, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(results[0][0][0], results[1][0][0])  # new noise (and data) each step
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_compiled_conv_and_linear_full_graph_with_the_buffer(fresh_dynamo):
    model = conv_toy()
    for buffered in (False, True):
        flat = FlatLora(model, sigma=0.3, schedule="constant", seed=2, noise_buffer=buffered)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        _assert_close(_steps(model, compiled, flat, lambda m, step: conv_loss(m), 2), rtol=1e-5, atol=1e-7)


def test_the_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) implementations, autograd registration, AOT dispatch of both noisy ops."""
    from flatlora_diffusion.flat.noisy_ops import NoiseSlot

    linear, conv = NoiseSlot(), NoiseSlot()
    linear.seed.fill_(123)
    conv.seed.fill_(5)
    x = torch.randn(3, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.flatlora.linear,
                          (x, torch.randn(8, 6), torch.randn(8), torch.rand(8), linear.seed, linear.key))
    images = torch.randn(2, 3, 9, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.flatlora.conv2d, (images, torch.randn(4, 3, 3, 3), None, torch.rand(4),
                                                      conv.seed, conv.key, [2, 2], [1, 1], [1, 1]))
