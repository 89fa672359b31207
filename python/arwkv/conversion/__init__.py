"""Making students from checkpoints: ``convert`` (a teacher -> its student) and ``hybridize``
(a student -> a hybrid that gets the teacher's attention back in chosen layers)."""
