"""MMDetection plugin package: SAM detector wrapper and configs."""
