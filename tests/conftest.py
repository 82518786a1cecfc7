import os

# Built models (tiny-text, tiny-vlm, the converted SmolLM2) are cached under the repo, so the suite
# never touches a user's cache and later runs reuse them; set SFTRL_CACHE to override.
os.environ.setdefault("SFTRL_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  ".cache", "models"))
