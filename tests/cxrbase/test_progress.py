import io
import sys

import pytest

from cxrbase import bar, interactive, progress


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not interactive()
    items = [1, 2, 3]
    assert progress(items, total=3, desc="x") is items  # the plain iterable
    b = bar(10, desc="x")
    assert b.disable
    b.update(3)
    b.close()


def test_a_terminal_gets_a_bar_unless_ci_or_disabled(monkeypatch):
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv("CI", raising=False)
    assert interactive()
    wrapped = progress([1, 2, 3], total=3, desc="steps")
    assert wrapped is not None and list(wrapped) == [1, 2, 3]
    assert progress([1], enabled=False) == [1]
    b = bar(5, initial=2, desc="steps")
    assert not b.disable and b.n == 2
    b.close()
    assert bar(5, enabled=False).disable
    monkeypatch.setenv("CI", "true")
    assert not interactive()
    items = [4]
    assert progress(items) is items


@pytest.mark.parametrize("value,expected", [("", True), ("1", False)])
def test_empty_ci_counts_as_unset(monkeypatch, value, expected):
    monkeypatch.setattr(sys, "stderr", _TTY())
    monkeypatch.setenv("CI", value)
    assert interactive() is expected


@pytest.mark.parametrize("tty", [False, True])
def test_progress_does_not_iterate_a_loader_early(monkeypatch, tty):
    # tqdm.auto's constructor calls iter(loader), which draws a base seed from the loader's generator.
    import torch
    from torch.utils.data import DataLoader

    monkeypatch.setattr(sys, "stderr", _TTY() if tty else io.StringIO())
    monkeypatch.delenv("CI", raising=False)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(list(range(10)), batch_size=5, shuffle=True, generator=gen)
    state = gen.get_state()
    wrapped = progress(loader, total=2)
    assert torch.equal(gen.get_state(), state)
    expected_gen = torch.Generator().manual_seed(0)
    expected = [b.tolist() for b in DataLoader(list(range(10)), batch_size=5, shuffle=True, generator=expected_gen)]
    assert [b.tolist() for b in wrapped] == expected
