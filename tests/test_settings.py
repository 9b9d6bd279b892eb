import pytest

from qlora_edu.common.settings import pick, smoke_mode


def test_smoke_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv("QLORA_EDU_SMOKE", "1")
    assert smoke_mode() and pick(100, 10) == 10
    monkeypatch.setenv("QLORA_EDU_SMOKE", "0")
    assert not smoke_mode() and pick(100, 10) == 100
    monkeypatch.delenv("QLORA_EDU_SMOKE")
    assert not smoke_mode()


def test_bad_smoke_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("QLORA_EDU_SMOKE", "yes")
    with pytest.raises(ValueError, match="QLORA_EDU_SMOKE"):
        smoke_mode()
