"""What the seven files of the method import but is not the method: pretrained encoders,
devices and precision, several processes, the clothing lexicon, annotator styles, the two
retrieval stages and the pictures. Nothing here imports an entry script."""
