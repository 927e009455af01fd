"""`mozo study`: plans, their controls and seeds as ordinary runs, compared by paired differences."""
