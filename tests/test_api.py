"""The public API: construction, composition, modes, and errors on bad input."""

from __future__ import annotations

import inspect

import pytest
import torch

import invfunc as inv


def test_decorator_with_and_without_function_argument_keeps_metadata() -> None:
    @inv.invertible(inverse=lambda y, w: y - w)
    def shift(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Shift by w."""
        return x + w

    assert isinstance(shift, inv.Invertible)
    assert shift.__name__ == "shift" and shift.__doc__ == "Shift by w."
    assert list(inspect.signature(shift).parameters) == ["x", "w"]
    f = inv.invertible(torch.exp, inverse=torch.log)
    assert f.inverse.inverse is f and inv.inverse(f) is f.inverse


def test_chain_order_inverse_and_flattening() -> None:
    add = inv.invertible(lambda x: x + 1, inverse=lambda y: y - 1)
    dbl = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2)
    f = inv.chain(add, dbl)
    x = torch.tensor([3.0])
    assert f(x).item() == 8.0  # dbl(add(x))
    assert f.inverse(f(x)).item() == 3.0
    assert f.inverse.inverse is f
    nested = inv.chain(f, inv.chain(add, f))
    assert [b for b in nested.blocks] == [add, dbl, add, add, dbl]
    torch.testing.assert_close(nested(x), f(add(f(x))))


def test_couple_forms() -> None:
    torch.manual_seed(0)
    F, G = torch.nn.Linear(2, 2).double(), torch.nn.Linear(2, 2).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    block = inv.couple(F, G)
    y = block(x)
    torch.testing.assert_close(y[:, :2], x[:, :2] + F(x[:, 2:]))
    torch.testing.assert_close(y[:, 2:], x[:, 2:] + G(y[:, :2]))
    torch.testing.assert_close(block.inverse(y), x)
    y1, y2 = block(x[:, :2], x[:, 2:])
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    one_sided = inv.couple(F)
    torch.testing.assert_close(one_sided(x)[:, 2:], x[:, 2:])
    last = inv.couple(torch.nn.Linear(2, 2).double(), dim=-1)
    torch.testing.assert_close(last.inverse(last(x)), x)


def test_plain_mode_and_grad_disabled_are_plain_calls() -> None:
    block = inv.couple(torch.nn.Linear(2, 2))
    x = torch.randn(3, 4, requires_grad=True)
    assert inv.invertible_call(block, x * 1, mode="plain").grad_fn.name() == "CatBackward0"
    with inv.mode("plain"):
        assert inv.invertible_call(block, x * 1).grad_fn.name() == "CatBackward0"
    with inv.mode("plain"):
        y = inv.invertible_call(block, x * 1, mode="invertible")  # the call's mode wins
    assert "BlockFunction" in y.grad_fn.name()
    with torch.no_grad():
        assert inv.invertible_call(block, x).grad_fn is None


def test_nothing_requires_grad_is_a_plain_call() -> None:
    block = inv.couple(lambda h: h * 2)
    x = torch.randn(3, 4)
    y = inv.invertible_call(block, x)
    assert y.grad_fn is None and not y.requires_grad


# -- errors: name the call, say what was received, say the fix ---------------------------


def test_unknown_mode() -> None:
    block = inv.couple(torch.nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"invertible_call\(couple\(Linear\).*unknown mode 'fast'.*'invertible'"
    ):
        inv.invertible_call(block, torch.randn(1, 4), mode="fast")
    with pytest.raises(ValueError, match=r"invfunc.mode\(value\): unknown mode"):
        with inv.mode("fast"):  # type: ignore[arg-type]
            pass


def test_not_an_invertible() -> None:
    with pytest.raises(
        TypeError, match=r"invertible_call\(fn, \*args\): fn must be an Invertible.*invertible\(fn, inverse"
    ):
        inv.invertible_call(torch.exp, torch.randn(2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"chain\(\*fns\): argument 1 is .*not an Invertible"):
        inv.chain(inv.couple(torch.nn.Linear(1, 1)), torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"inverse\(fn\): fn must be an Invertible"):
        inv.inverse(torch.exp)  # type: ignore[arg-type]


def test_wrong_arity() -> None:
    f = inv.invertible(lambda x, w: x * w, inverse=lambda y, w: y / w)
    with pytest.raises(TypeError, match=r"invertible_call\(<lambda>, \.\.\.\): <lambda> takes 2 positional"):
        inv.invertible_call(f, torch.randn(2, requires_grad=True))
    with pytest.raises(TypeError, match=r"takes one tensor or a pair, nothing else"):
        inv.invertible_call(
            inv.couple(torch.nn.Linear(1, 1)), torch.randn(2, 2), torch.randn(2, 2), torch.randn(1)
        )


def test_odd_split_and_bad_dim_and_bad_half() -> None:
    block = inv.couple(torch.nn.Linear(3, 2))  # an odd size 5 is split 2 + 3: F maps 3 to 2
    assert inv.invertible_call(block, torch.randn(2, 5, requires_grad=True)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"size 1 along dim 1 .* needs a size of at least 2"):
        inv.invertible_call(block, torch.randn(2, 1, requires_grad=True))
    with pytest.raises(ValueError, match=r"dim=3 is out of range"):
        inv.invertible_call(inv.couple(torch.nn.Linear(2, 2), dim=3), torch.randn(2, 4, requires_grad=True))
    bad = inv.couple(lambda h: h.sum(1))
    with pytest.raises(
        ValueError,
        match=r"F returned a tensor of shape \(2,\) for an input of shape \(2, 2\); F must return a "
        r"tensor shaped like x1, \(2, 2\)",
    ):
        inv.invertible_call(bad, torch.randn(2, 4, requires_grad=True))


def test_inverse_returning_the_wrong_shape() -> None:
    f = inv.invertible(lambda x: x * 2, inverse=lambda y: (y / 2)[:1])
    x = torch.randn(3, requires_grad=True)
    y = inv.invertible_call(f, x * 1)
    with pytest.raises(
        inv.InvfuncError, match=r"invertible_call\(<lambda>\) backward: the inverse rebuilt input 0"
    ):
        y.sum().backward()


def test_inverse_returning_too_many_values() -> None:
    f = inv.invertible(lambda x: x * 2, inverse=lambda y: (y / 2, y))
    y = inv.invertible_call(f, torch.randn(3, requires_grad=True) * 1)
    with pytest.raises(inv.InvfuncError, match=r"the inverse returned a tuple of 2 but the block has 1"):
        y.sum().backward()


def test_block_returning_a_non_tensor() -> None:
    f = inv.invertible(lambda x: [x], inverse=lambda y: y)
    with pytest.raises(TypeError, match=r"returned a list.*tensor or a tuple of tensors"):
        inv.invertible_call(f, torch.randn(3, requires_grad=True))


def test_bad_keep_and_bad_decorator_arguments() -> None:
    f = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2)
    with pytest.raises(ValueError, match=r"keep=\.\.\.\): 5 is neither a tensor nor a position"):
        inv.invertible_call(f, torch.randn(3, requires_grad=True), keep=(5,))
    with pytest.raises(ValueError, match=r"n_inputs= must be a positive int"):
        inv.invertible(lambda x: x, inverse=lambda y: y, n_inputs=0)
    with pytest.raises(TypeError, match=r"inverse= must be a callable"):
        inv.invertible(lambda x: x, inverse=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"couple\(F, G\): F must be callable"):
        inv.couple(3)  # type: ignore[arg-type]


def test_keyword_arguments_are_a_clear_error() -> None:
    f = inv.invertible(lambda x, s: x * s, inverse=lambda y, s: y / s)
    x = torch.randn(3, requires_grad=True)
    msg = r"invertible_call\(<lambda>, \*args, s=\.\.\.\): keyword arguments are not passed"
    with pytest.raises(TypeError, match=msg):
        inv.invertible_call(f, x * 1, s=2.0)
    torch.testing.assert_close(inv.invertible_call(f, x * 1, 2.0), x * 2)  # positionally: fine


def test_already_freed_input_from_a_foreign_free_is_a_clear_error() -> None:
    f = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2)
    x = torch.randn(3, requires_grad=True) * 1
    x.untyped_storage().resize_(0)
    with pytest.raises(inv.FreedTensorError, match="has no storage"):
        inv.invertible_call(f, x)


def test_partials_are_named_by_the_function_they_wrap() -> None:
    import functools

    def conv(h: torch.Tensor, scale: float) -> torch.Tensor:
        return h * scale

    block = inv.couple(functools.partial(conv, scale=0.5), functools.partial(conv, scale=2.0))
    assert block._name == "couple(conv, conv)"
    with inv.explain() as report:
        inv.invertible_call(block, torch.randn(2, 4, requires_grad=True) * 1)
    assert report.freed[0][0] == "couple(conv, conv)"
