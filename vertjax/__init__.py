"""vertjax: vertebra centroid localisation and naming in spine radiographs."""
