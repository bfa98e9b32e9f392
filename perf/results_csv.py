"""A results CSV that a shorter run never overwrites.

A run writes its rows as it goes (a run cut short keeps what it measured). While it holds
fewer rows than the file held when the run began, say a quick run where a full one was
committed, its rows go to <name>.partial.csv beside the file instead.
"""
from pathlib import Path

import pandas as pd


class ResultsCsv:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows_before = (len(pd.read_csv(self.path))
                            if self.path.exists() and self.path.stat().st_size else 0)
        self.partial = self.path.with_name(f"{self.path.stem}.partial.csv")

    def write(self, df: pd.DataFrame) -> Path:
        """Writes df where it may go and returns that path."""
        if len(df) >= self.rows_before:
            df.to_csv(self.path, index=False)
            self.partial.unlink(missing_ok=True)
            return self.path
        df.to_csv(self.partial, index=False)
        return self.partial
