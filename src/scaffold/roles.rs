//! The roles a draft proposes: every step compensatable (or a check) until the first
//! statement that cannot be undone, which becomes the pivot; every step after the
//! pivot retriable — the order `skald validate` requires (README, "Roles").

use super::rules::UndoKind;

/// A proposed role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Before the pivot, undone by its compensation.
    Compensatable,
    /// Before the pivot, read-only.
    Check,
    /// The first step that cannot be undone.
    Pivot,
    /// After the pivot: retried until it succeeds, never undone.
    Retriable,
}

impl Role {
    /// As written in a saga file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Compensatable => "compensatable",
            Role::Check => "check",
            Role::Pivot => "pivot",
            Role::Retriable => "retriable",
        }
    }
}

/// One role per step, in order, from what each step's undo is.
pub fn propose(kinds: &[UndoKind]) -> Vec<Role> {
    let mut pivot_seen = false;
    kinds
        .iter()
        .map(|kind| match (pivot_seen, kind) {
            (true, _) => Role::Retriable,
            (false, UndoKind::Never) => {
                pivot_seen = true;
                Role::Pivot
            }
            (false, UndoKind::Check) => Role::Check,
            (false, UndoKind::Undoable) => Role::Compensatable,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use UndoKind::*;

    #[test]
    fn compensatable_until_the_first_step_that_cannot_be_undone_then_retriable() {
        assert_eq!(
            propose(&[Check, Undoable, Never, Undoable, Never, Check]),
            vec![
                Role::Check,
                Role::Compensatable,
                Role::Pivot,
                Role::Retriable,
                Role::Retriable,
                Role::Retriable
            ]
        );
    }

    #[test]
    fn without_a_step_that_cannot_be_undone_there_is_no_pivot() {
        assert_eq!(
            propose(&[Undoable, Check, Undoable]),
            vec![Role::Compensatable, Role::Check, Role::Compensatable]
        );
        assert_eq!(propose(&[Never]), vec![Role::Pivot]);
        assert!(propose(&[]).is_empty());
    }
}
