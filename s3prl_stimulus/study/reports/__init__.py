"""The paper's tables and figures from a tree of finished runs (either training path).

One concern per module; each imports only the ones listed before it:

- :mod:`.runs`: results JSON, predictions CSV and layer weights read and checked; the study (which runs, missing ones).
- :mod:`.scoring`: five folds pooled per seed, bootstrap CIs, cells (mean ± std over seeds), paired tests with Holm.
- :mod:`.build`: :func:`build_report`, the whole report computed in memory (scores, Table II, Table IV's upstream).
- :mod:`.tables`: Tables II-IV, per-class F1 and the paired tests as markdown, CSV and LaTeX (booktabs).
- :mod:`.reproduction`: the report's cells beside the paper's published ones (:mod:`s3prl_stimulus.paper`).
- :mod:`.figures`: Fig. 2 (layer weights), cross-testing heatmap and per-class F1 bars as PNG and PDF.
- :mod:`.writer`: :func:`write_report` (every file, then ``index.md`` linking them) and :func:`make_report`.
"""

from s3prl_stimulus.study.reports.build import Report, build_report
from s3prl_stimulus.study.reports.figures import FIGURE_DPI, FIGURE_INCHES, FIGURE_PIXELS
from s3prl_stimulus.study.reports.reproduction import Reproduction, compare_with_paper
from s3prl_stimulus.study.reports.scoring import ScoreSettings
from s3prl_stimulus.study.reports.writer import make_report, write_report

__all__ = [
    "FIGURE_DPI", "FIGURE_INCHES", "FIGURE_PIXELS", "Report", "Reproduction", "ScoreSettings", "build_report",
    "compare_with_paper", "make_report", "write_report",
]
