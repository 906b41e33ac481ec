"""Running hostgpu's parts together: locally (`hostgpu up`) or as a hybrid compose stack."""
