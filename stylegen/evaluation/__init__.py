"""Quality: metric functions (scikit-learn), cross-validation and held-out runs, reports."""
