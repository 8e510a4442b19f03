"""Rule scripts' logging: one file per job, and the one warning it drops."""

from __future__ import annotations

import logging
import sys
import warnings

from abliterate import logs


def test_to_file_collects_logs_and_stderr_and_drops_peft_s_deprecation_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored after the test
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    path = tmp_path / "logs" / "job.log"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logs.to_file(path)
            logging.getLogger("abliterate.test").info("a decision")
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                          "`is_activation_checkpointing` instead.", FutureWarning, stacklevel=1)
            warnings.warn("something new", FutureWarning, stacklevel=1)
            print("a traceback", file=sys.stderr)
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = path.read_text()
    assert "INFO    abliterate.test: a decision" in text and "a traceback" in text
    assert [str(w.message) for w in caught] == ["something new"]
