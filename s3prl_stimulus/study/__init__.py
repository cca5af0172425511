"""The paper's study end to end: the corpus (download, verify), the authors' released models (import), the
resumable recipe, the reports."""
