"""The README documents every setting and the two commands CI and newcomers rely on."""
from pathlib import Path

import train_gpt as tg

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented():
    missing = [s.name for s in tg.SETTINGS if f"`{s.name}`" not in README]
    assert not missing, f"README lacks {missing}: regenerate its settings table"


def test_readme_has_the_two_commands():
    assert "pip install -r requirements.txt && python train_gpt.py" in README
    assert "<!-- test-command -->" in README and "pytest" in README.split("<!-- test-command -->", 1)[1][:300]
