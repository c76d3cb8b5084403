//! What every error enum of Ignis shares: a fixed, machine-matchable word per variant (the
//! `reason` of conditions, Events and metric labels) and a one-line message with its causes.
//!
//! Reasons are derived, never matched by hand: each error enum derives
//! [`strum::IntoStaticStr`], the variant's name being its word unless
//! `#[strum(serialize = "...")]` names another one, and a variant that wraps another error
//! takes that error's word with `#[strum(transparent)]`.

/// An error with a fixed word per variant.
pub trait ErrorReason {
    /// The word for condition reasons, Events and metric labels (never a Debug string: label
    /// cardinality stays bounded).
    fn reason(&self) -> &'static str;
}

impl<T> ErrorReason for T
where
    for<'a> &'a T: Into<&'static str>,
{
    fn reason(&self) -> &'static str {
        self.into()
    }
}

/// The error's message followed by each of its causes, `: `-separated, for a person.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
    enum Inner {
        #[error("inner")]
        #[strum(serialize = "InnerWord")]
        Renamed,
    }

    #[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
    enum Outer {
        #[error("plain")]
        Plain,
        #[error("wrapped")]
        #[strum(transparent)]
        Wrapped(#[source] Inner),
    }

    #[test]
    fn reasons_are_variant_names_renames_or_the_wrapped_errors() {
        assert_eq!(Outer::Plain.reason(), "Plain");
        assert_eq!(Outer::Wrapped(Inner::Renamed).reason(), "InnerWord");
        assert_eq!(chain(&Outer::Wrapped(Inner::Renamed)), "wrapped: inner");
    }
}
