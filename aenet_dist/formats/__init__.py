"""aenet's file formats, one module per format: the text inputs (:mod:`.stp`, :mod:`.generate_in`,
:mod:`.train_in`, :mod:`.predict_in`, over the shared pieces in :mod:`.text`) and the ``.nn``
potential files (:mod:`.nn`)."""
