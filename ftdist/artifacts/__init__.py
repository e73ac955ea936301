"""What is made from a run: export, generation, classification, reports."""
