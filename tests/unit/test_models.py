import pytest
import torch

from carousel.config import ModelConfig
from carousel.models.lm import LanguageModel, sample
from carousel.models.recurrent import RecurrentConfig, StackedRecurrent, detach_state, flatten_state, unflatten_state


def test_lstm_init_forget_bias_and_orthogonal_recurrence():
    core = StackedRecurrent(RecurrentConfig(input_size=16, hidden=32, layers=2, gate_bias=1.0))
    for rnn in core.rnns:
        b = rnn.bias_ih_l0 + rnn.bias_hh_l0
        h = 32
        assert torch.allclose(b[h : 2 * h], torch.ones(h)) and torch.count_nonzero(b) == h
        for gate in rnn.weight_hh_l0.chunk(4, 0):
            assert torch.allclose(gate @ gate.T, torch.eye(h), atol=1e-5)


def test_gru_update_gate_bias():
    core = StackedRecurrent(RecurrentConfig(input_size=8, hidden=8, layers=1, cell="gru", gate_bias=2.0))
    b = core.rnns[0].bias_ih_l0
    assert torch.allclose(b[8:16], torch.full((8,), 2.0)) and torch.count_nonzero(b) == 8


@pytest.mark.parametrize("cell,layers,proj", [("lstm", 8, None), ("gru", 3, None), ("lstm", 2, 24)])
def test_lm_overfits_one_batch(cell, layers, proj):
    torch.manual_seed(0)
    embed = proj or 32
    cfg = ModelConfig(cell=cell, layers=layers, hidden=32, embed=embed, proj=proj, dropout=0.0, output_dropout=0.0)
    model = LanguageModel(cfg, vocab_size=50)
    x = torch.randint(0, 50, (4, 24))
    y = torch.roll(x, -1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, _ = model(x, None, targets=y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.1 * first, (first, float(loss))


def test_deep_stack_passes_gradient_to_the_first_layer():
    """Residual + forget-bias init: the bottom of an 8-layer stack gets a usable gradient from step 1."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=8, hidden=32, embed=32), vocab_size=40)
    x = torch.randint(0, 40, (2, 50))
    loss, _ = model(x, None, targets=x)
    loss.backward()
    bottom = model.core.rnns[0].weight_ih_l0.grad.norm()
    top = model.core.rnns[-1].weight_ih_l0.grad.norm()
    assert bottom > 0.05 * top


def test_long_range_gradient_survives_hundreds_of_steps():
    """The constant error carousel: d(output at t=400)/d(input at t=0) is not vanishingly small."""
    torch.manual_seed(0)
    core = StackedRecurrent(RecurrentConfig(input_size=8, hidden=64, layers=2, gate_bias=1.0))
    x = torch.randn(1, 400, 8, requires_grad=True)
    y, _ = core(x)
    y[0, -1].sum().backward()
    assert x.grad[0, 0].abs().sum() > 1e-12


def test_padding_does_not_change_packed_results():
    torch.manual_seed(0)
    core = StackedRecurrent(RecurrentConfig(input_size=4, hidden=8, layers=2, bidirectional=True)).eval()
    a = torch.randn(1, 5, 4)
    padded = torch.cat([a, torch.randn(1, 3, 4) * 100], 1)  # garbage padding
    y_short, _ = core(a, lengths=torch.tensor([5]))
    y_pad, _ = core(padded, lengths=torch.tensor([5]))
    assert torch.allclose(y_short, y_pad[:, :5], atol=1e-6)
    assert torch.all(y_pad[:, 5:] == 0)


def test_tied_weights_share_storage():
    m = LanguageModel(ModelConfig(hidden=16, embed=16, tie_weights=True), 30)
    assert m.head.weight is m.embed.weight
    assert m.num_parameters() < LanguageModel(ModelConfig(hidden=16, embed=16, tie_weights=False), 30).num_parameters()


def test_state_round_trip_and_detach():
    m = LanguageModel(ModelConfig(hidden=16, embed=16, layers=3), 30)
    _, state = m(torch.randint(0, 30, (2, 5)))
    flat = flatten_state(state)
    assert len(flat) == 6 and all(not t.requires_grad for t in flat)
    back = unflatten_state(flat, "lstm", "cpu")
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(detach_state(state), back))


def test_greedy_sampling_is_deterministic_and_sampling_respects_top_k():
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(hidden=16, embed=16), 30)
    assert sample(m, [1, 2], 10, temperature=0) == sample(m, [1, 2], 10, temperature=0)
    g = torch.Generator().manual_seed(0)
    out = sample(m, [1], 50, temperature=1.0, top_k=1, generator=g)
    assert out == sample(m, [1], 50, temperature=0)  # top-1 sampling is greedy


def test_flops_per_token_formula():
    m = LanguageModel(ModelConfig(layers=2, hidden=10, embed=10), 7)
    assert m.flops_per_token() == 3 * (2 * (8 * 10 * 20) + 2 * 10 * 7)


def test_generate_text_mid_training_leaves_the_mode_and_the_rng_alone():
    """Rank 0 writes sample generations into every checkpoint: that must not change training."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from carousel.models.lm import generate_text

    words = ["<eos>", "in", "the", "beginning", "god", "created", "heaven", "and", "earth"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(hidden=16, embed=16, dropout=0.5), len(words)).train()
    before = torch.get_rng_state()
    a = generate_text(m, tok, "in the", 12, temperature=0.8, top_k=5, seed=3)
    assert m.training and torch.equal(torch.get_rng_state(), before)
    assert a.startswith("in the") and a == generate_text(m, tok, "in the", 12, temperature=0.8, top_k=5, seed=3)
