-- What the business sees of one trip: `skald explore` compares these after every fault.
-- Rooms, seats and cars left, and the bookings, tickets and rentals that stand
-- (cancelled ones are what compensation leaves behind, and do not count). Parameters
-- are the start payload's fields.
SELECT hotel_id, rooms_free FROM travel.hotels WHERE hotel_id = :hotel;
SELECT trip_id, hotel_id, nights FROM travel.hotel_bookings WHERE trip_id = :trip_id AND NOT cancelled;
SELECT flight_id, seats_free FROM travel.flights WHERE flight_id = :flight;
SELECT trip_id, flight_id FROM travel.flight_tickets WHERE trip_id = :trip_id AND NOT cancelled;
SELECT city, cars_free FROM travel.car_desks WHERE city = :city;
SELECT trip_id, city FROM travel.car_rentals WHERE trip_id = :trip_id;
