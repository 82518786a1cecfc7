import os

# Built models (tiny-text, tiny-vlm, the converted SmolLM2) are cached under the repo, so the suite
# never touches a user's cache and later runs reuse them; set SFTRL_CACHE to override.
os.environ.setdefault("SFTRL_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  ".cache", "models"))


import contextlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def killed_after_save():
    """`with killed_after_save("step-000003"): train(...)`: the run dies (KeyboardInterrupt) right after
    writing that checkpoint, as an interrupted job would; the with-block expects and absorbs the interrupt."""
    import model as M

    @contextlib.contextmanager
    def arm(name: str):
        original = M.Policy.save

        def save_then_die(self, path, extras=None):
            original(self, path, extras)
            if path.endswith(name):
                raise KeyboardInterrupt(f"killed after the {name} checkpoint")
        M.Policy.save = save_then_die
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            M.Policy.save = original
    return arm
