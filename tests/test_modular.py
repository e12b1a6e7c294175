"""experiments.modular: masses and sensitivities give each atom its share of the step (docs/MATH.md)."""

import pytest
import torch

from experiments.modular import (
    add,
    atom,
    bond,
    chain,
    compose,
    concatenate,
    modular_groups,
    modular_norm,
    residual,
    scale,
    stack,
    step_shares,
)
from optim import Muon


@pytest.mark.parametrize("depth", [1, 2, 5, 16])
def test_a_chain_of_unit_mass_layers_gives_each_layer_one_over_depth(depth):
    shares = step_shares(chain([f"w{i}" for i in range(depth)]))
    assert shares == pytest.approx({f"w{i}": 1 / depth for i in range(depth)}, rel=1e-12)


def test_composition_divides_the_inner_share_by_the_outer_sensitivity():
    # μ = 1 + 3: inner gets (1/4)/ν_outer with ν_outer = 2·1 (the bond, then b), outer gets 3/4.
    shares = step_shares(compose(atom("a", 1.0), bond(2.0), atom("b", 3.0)))
    assert shares == pytest.approx({"a": 1 / 8, "b": 3 / 4}, rel=1e-12)


def test_concatenation_splits_by_mass():
    shares = step_shares(concatenate(atom("q", 1.0), atom("k", 1.0), atom("v", 2.0)))
    assert shares == pytest.approx({"q": 0.25, "k": 0.25, "v": 0.5}, rel=1e-12)


def test_a_stack_is_the_concatenation_of_its_matrices_with_one_name():
    # compose(qkv, bond(1/3), o): as a stack or as three atoms, each matrix of qkv takes the same share.
    apart = step_shares(compose(concatenate(atom("q"), atom("k"), atom("v")), bond(1 / 3), atom("o")))
    stacked = step_shares(compose(stack("qkv", 3), bond(1 / 3), atom("o")))
    assert stacked == pytest.approx({"qkv": apart["q"], "o": apart["o"]}, rel=1e-12)
    assert apart["q"] == apart["k"] == apart["v"] == pytest.approx(3 * apart["o"], rel=1e-12)
    # its norm is the concatenation's, 3 max_i ‖W_i‖, from the largest matrix norm
    three = concatenate(atom("q"), atom("k"), atom("v"))
    assert modular_norm(stack("qkv", 3), {"qkv": 2.0}) == 6.0
    assert modular_norm(three, dict(q=2.0, k=1.0, v=0.5)) == 6.0


def test_a_sum_adds_sensitivities_and_splits_the_step_by_mass():
    summed = add(atom("a", 1.0, sensitivity=2.0), atom("b", 3.0, sensitivity=0.5))
    assert (summed.mass, summed.sensitivity) == (4.0, 2.5)
    assert step_shares(summed) == pytest.approx({"a": 1 / 4, "b": 3 / 4}, rel=1e-12)


@pytest.mark.parametrize("a", [0.25, -0.25])
def test_a_scaled_module_takes_one_over_abs_a_of_the_step(a):
    scaled = scale(atom("w", 2.0, sensitivity=3.0), a)
    assert (scaled.mass, scaled.sensitivity) == (2.0, 0.75)
    assert step_shares(scaled) == pytest.approx({"w": 4.0}, rel=1e-12)


@pytest.mark.parametrize("a", [1 / 2, 1 / 5, 1.0])
def test_a_residual_keeps_sensitivity_one_and_gives_its_branch_one_over_a(a):
    block = residual(compose(atom("fc"), bond(1.0), atom("proj")), a)
    assert block.mass == 2.0 and block.sensitivity == pytest.approx(1.0, rel=1e-12)
    assert step_shares(block) == pytest.approx({"fc": 0.5 / a, "proj": 0.5 / a}, rel=1e-12)


def test_residuals_in_a_chain_share_by_mass_times_one_over_their_weight():
    # embed (1), two residual branches of mass 2 at a = 1/2 and 1/3, head (1): total mass 6, ν = 1 throughout.
    f0, f1 = residual(atom("f0", 2.0), 1 / 2), residual(atom("f1", 2.0), 1 / 3)
    shares = step_shares(compose(atom("embed"), f0, f1, atom("head")))
    expected = {"embed": 1 / 6, "f0": 2 / 6 * 2, "f1": 2 / 6 * 3, "head": 1 / 6}
    assert shares == pytest.approx(expected, rel=1e-12)


def test_bad_scale_and_residual_weights_are_refused():
    with pytest.raises(ValueError, match="nonzero"):
        scale(atom("w"), 0.0)
    for a in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            residual(atom("w"), a)


@pytest.mark.parametrize("n_blocks", [1, 4, 12])
def test_gpt_embed_and_head_each_get_one_seventh_for_block_mass_five(n_blocks):
    blocks = compose(*(atom(f"block{i}", 5 / n_blocks) for i in range(n_blocks)))
    shares = step_shares(compose(atom("embed"), blocks, atom("head")))
    assert shares["embed"] == pytest.approx(1 / 7, rel=1e-12)
    assert shares["head"] == pytest.approx(1 / 7, rel=1e-12)
    assert sum(shares[f"block{i}"] for i in range(n_blocks)) == pytest.approx(5 / 7, rel=1e-12)


@pytest.mark.parametrize(
    "module",
    [
        chain(["w0", "w1", "w2"]),
        compose(atom("embed"), concatenate(atom("q"), atom("k", 2.0)), bond(0.5), atom("head", 3.0)),
        concatenate(compose(atom("a"), bond(2.0), atom("b")), atom("c", 0.5)),
        compose(atom("embed"), residual(compose(atom("q"), atom("o")), 0.5), residual(atom("fc", 2.0), 0.2),
                atom("head", 3.0)),
        add(scale(atom("a"), 3.0), compose(atom("b"), bond(0.5), atom("c"))),
        compose(atom("embed"), stack("qkv", 3, 0.5), bond(1 / 3), atom("o")),
    ],
)
def test_the_dualized_compound_has_modular_norm_exactly_one(module):
    # Each atom's dualized gradient has norm 1 in its own norm; scaled by its share it has norm = share.
    shares = step_shares(module)
    assert modular_norm(module, shares) == pytest.approx(1.0, rel=1e-12)


def test_modular_groups_set_each_group_lr_to_lr_times_share():
    layers = {name: [torch.zeros(4, 4, requires_grad=True)] for name in ("w0", "w1", "w2", "w3")}
    groups = modular_groups(layers, chain(layers), lr=0.2, kind="hidden", momentum=0.0)
    assert [g["lr"] for g in groups] == pytest.approx([0.05] * 4, rel=1e-12)
    opt = Muon(groups)
    assert all(g["kind"] == "hidden" and g["momentum"] == 0.0 for g in opt.param_groups)


def test_modular_groups_give_named_atoms_their_own_kind():
    layers = {name: [torch.zeros(4, 4, requires_grad=True)] for name in ("embed", "w", "head")}
    groups = modular_groups(layers, chain(layers), lr=0.3, kinds={"embed": "embed", "head": "head_linear"},
                            kind="hidden")
    assert [g["kind"] for g in groups] == ["embed", "hidden", "head_linear"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1] * 3, rel=1e-12)


def test_modular_groups_refuse_params_that_do_not_match_the_atoms():
    with pytest.raises(ValueError, match="params name atoms"):
        modular_groups({"w0": []}, chain(["w0", "w1"]), lr=0.1)
    with pytest.raises(ValueError, match="params name atoms"):
        modular_groups({"w0": [], "w1": []}, chain(["w0", "w1"]), lr=0.1, kinds={"w2": "embed"})


def test_an_atom_needs_positive_mass_and_a_unique_name():
    with pytest.raises(ValueError, match="mass must be > 0"):
        atom("w", 0.0)
    with pytest.raises(ValueError, match="appears twice"):
        step_shares(compose(atom("w"), atom("w")))
