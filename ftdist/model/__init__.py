"""The model: building it (4-bit, adapters, freezing), attention, compilation."""
