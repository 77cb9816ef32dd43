"""The run report: ``vlapt report RUN_DIR [RUN_DIR ...]`` writes one self-contained HTML page.

It reads only the files runs leave behind (results, histories, videos, configs, provenance);
see `vlapt.report.runs` for which.
"""

from vlapt.report.html import build_report
from vlapt.report.runs import Run, read_run

__all__ = ["Run", "build_report", "read_run"]
