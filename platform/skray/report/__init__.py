"""What a labeling output holds, for people: the scan, charts, the HTML page and review files."""
