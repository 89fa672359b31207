import os

from hypothesis import settings

# Reproducible and bounded in CI; `HYPOTHESIS_PROFILE=dev` explores more.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
