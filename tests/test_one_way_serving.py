"""The served MLflow model formats raw columns with the templates' one owner, without `datasets`."""
from __future__ import annotations

import subprocess
import sys


def test_the_served_model_imports_no_datasets():
    check = "import sys, softprompt.serving.served_model; assert 'datasets' not in sys.modules, 'datasets imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
