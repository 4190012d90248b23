"""The fast training path computes what the plain path computes: loss, gradients, attention."""

import torch
from transformers import AutoModelForCausalLM

import lorakit.training.loss as chunked


def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_base, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).train()
    model.config.use_cache = False
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 40))
    labels = ids.clone()
    labels[0, :10] = -100  # masked prompt tokens never reach the head
    labels[1, 30:] = -100
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 16)  # several chunks
    loss_func = chunked.make_loss(chunked.output_head(model))
    chunked.install(model)
    loss = loss_func(model(input_ids=ids), labels)
    loss.backward()
    torch.testing.assert_close(loss, reference)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5)
    chunked.remove(model)
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_bf16_is_the_cpu_default_only_where_the_cpu_runs_it_natively():
    from lorakit.weights.loading import cpu_has_native_bf16, resolve_dtype

    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("fp32", "cpu") == torch.float32


def test_packed_attention_equals_the_masked_attention_it_replaces(tiny_base):
    """Per-example fused attention gives the logits and gradients of transformers' block-diagonal mask."""
    from lorakit.training.attention import restore, use_packed
    from lorakit.weights.loading import for_training

    model = for_training(AutoModelForCausalLM.from_pretrained(tiny_base)).train()
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 12))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 1]])
    reference = model(input_ids=ids, position_ids=positions).logits
    reference.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    previous = use_packed(model)
    packed = model(input_ids=ids, position_ids=positions).logits
    packed.square().sum().backward()
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-4, rtol=1e-3)
    restore(model, previous)
    assert model.config._attn_implementation == "sdpa"


def test_the_loss_stays_finite_where_a_target_probability_underflows():
    """A target 200 logits below the best one: fp32 softmax gives it probability 0, the loss must not be inf."""
    head = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(6, 4) * 100)
    hidden = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], requires_grad=True)
    targets = torch.tensor([1, 2])
    loss = chunked.make_loss(head)(type("Out", (), {"logits": torch.cat([hidden, hidden[:1]])[None]})(),
                                   torch.tensor([[-100, 1, 2]]))
    reference = torch.nn.functional.cross_entropy(head(hidden), targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference)


def test_cpu_training_keeps_freed_memory_where_the_c_library_is_glibc():
    import platform

    from lorakit.system.allocator import keep_freed_memory

    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
