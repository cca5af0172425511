"""The paper's study end to end: the corpus (download, verify), the resumable recipe, the reports."""
