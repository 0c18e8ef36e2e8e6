"""Test-wide settings: runs made by the tests never become the renderer's remembered last run."""
import os
import tempfile

# replicate.study.results.remember_run writes here instead of the repository's results/.last-run.json (subprocesses
# inherit it); a test that checks the memory points it at its own tmp_path.
os.environ["REPLICATE_LAST_RUN"] = os.path.join(tempfile.mkdtemp(prefix="replicate-tests-"), "last-run.json")
